"""VRAM planner: peak GPU memory of a training config, estimated before anything is downloaded
or allocated.

    grpo-fast plan --config configs/qwen2.5-1.5b-gsm8k-qlora.yaml --gpu-memory 12GiB
    grpo-fast plan --config configs/qwen2.5-1.5b-gsm8k-qlora.yaml --accelerate-config \
        configs/accelerate/zero2.yaml --num-processes 4 --gpu-memory 12GiB   # per GPU

    from grpo_fast.plan import GiB, estimate, model_shape
    plan = estimate(cfg, model_shape(cfg.model_path))   # MemoryPlan, byte counts
    plan.total, plan.allocated
    plan = estimate(cfg, shape, card=12 * GiB)          # generation_backend vllm: the engine
    plan.engine.kv_cache, plan.engine.waves             # takes its fraction of the card
    plan = estimate(cfg, shape, parallel=parallelism("configs/accelerate/fsdp2.yaml", 4))

Modules, in the order a plan is made:
  * shapes: the model's sizes, from a config file, a local directory, the Hugging Face cache or
    the shapes shipped in the package for known hub ids;
  * inputs: what the config implies: dtypes, the micro-batch, attention, LoRA targets;
  * params: the parameters tensor by tensor, as stored (quantized, trainable, optimizer states);
  * formulas: the memory formulas (their derivation is that module's docstring);
  * engine: the colocated vLLM engine of generation_backend vllm, which takes its fraction of
    the card instead of the trainer generating;
  * parallel: per-GPU memory of a run on N processes (DDP, FSDP2, DeepSpeed ZeRO-2/3), read
    from `--accelerate-config FILE` / `--num-processes N`;
  * fit: `--gpu-memory` sizes and the largest batch knobs that fit a card;
  * report: the `grpo-fast plan` text.

Tests: pytest tests/test_plan.py tests/test_plan_distributed.py
"""

from .formulas import (
    CUDA_OVERHEAD,
    GiB,
    MemoryPlan,
    estimate,
    layer_activation_bytes_per_token,
    weight_bytes,
)
from .engine import ENGINE_FIXED, EnginePlan, engine_plan
from .fit import FIT_SEARCH_MAX, fit_search, parse_memory
from .parallel import Parallelism, fsdp_weight_bytes, parallelism
from .report import offline_group_size, plan_command
from .shapes import HUB_SHAPES, SHAPES_DIR, ModelShape, model_shape, shape_from_config
from .inputs import (
    Precision,
    Workload,
    lora_param_count,
    lora_targets,
    planned_attention,
    planned_dtype,
    precision,
    workload,
)

__all__ = [
    "CUDA_OVERHEAD", "ENGINE_FIXED", "FIT_SEARCH_MAX", "GiB", "HUB_SHAPES", "SHAPES_DIR",
    "EnginePlan", "MemoryPlan", "ModelShape", "Parallelism", "Precision", "Workload",
    "engine_plan", "estimate", "fit_search", "fsdp_weight_bytes", "layer_activation_bytes_per_token",
    "lora_param_count", "lora_targets", "model_shape", "offline_group_size", "parallelism", "parse_memory",
    "plan_command", "planned_attention", "planned_dtype", "precision", "shape_from_config", "weight_bytes", "workload",
]
