r"""Per-GPU memory under data parallelism and sharding: which launcher setup a plan is for
(`Parallelism`, read from an accelerate config file or `--num-processes`) and how it turns one
process's plan into each GPU's.

    grpo-fast plan --config configs/tiny-online.yaml --accelerate-config configs/accelerate/fsdp2.yaml
    grpo-fast plan --config configs/qwen2.5-1.5b-gsm8k-qlora.yaml --num-processes 4   # DDP

    from grpo_fast.plan import estimate, model_shape, parallelism
    plan = estimate(cfg, shape, parallel=parallelism("configs/accelerate/zero2.yaml", 4))

Every process runs the config's batch_size prompts (groups, offline) per micro-batch, so the
activations, rollout and scoring phases are one process's, unchanged. With one process nothing
is wrapped or sharded: the plan is the plain one. With N > 1 (notation of
grpo_fast.plan.formulas; P: the trainable parameters, g: their gradient's bytes, l for LoRA and
w with full fine-tuning; per tensor, d0 its dim 0 and c the elements in the rest):

  * DDP (accelerate MULTI_GPU; torch DistributedDataParallel): everything replicated, plus DDP's
    gradient buckets, P x g: the Reducer allocates a flat buffer for every trainable gradient
    at construction (bucket_cap_mb = 25 MiB each), which the all-reduce works on; the .grad
    tensors stay separate unless gradient_as_bucket_view=True, which the trainer does not set
    (DistributedDataParallel's docstring: "the saved memory size will be equal to the total
    gradients size").
  * FSDP2 (fsdp_version 2, TRANSFORMER_BASED_WRAP: one fully_shard unit per decoder layer plus
    the root with the embeddings, the final norm and the LM head): every parameter is chunked
    along dim 0, each rank holding ceil(d0 / N) x c elements (torch.chunk's split; the last
    ranks hold fewer rows, but each rank's storage is padded to the first chunk's size, so the
    per-GPU figure is rank 0's). Weights, LoRA parameters, gradients (reduce-scattered into that
    padded layout) and AdamW's states (created like their local shard) are summed so, tensor by
    tensor. Gathered working copy, on top: the root keeps its full parameters from the forward
    through the backward (fully_shard leaves the root unsharded after forward, and the log-prob
    kernel reads the whole LM head), plus at most two decoder layers' full parameters (the one
    running and the next, prefetched); with fsdp_reshard_after_forward false every layer stays
    gathered until its backward. In the backward one layer's full gradient (its trainable
    parameters x g) exists before it is reduce-scattered: a transient of the training phase.
    An hf rollout with online.ds3_gather_for_generation (the default) gathers every unit for
    the decoding: the rest of the whole policy is a rollout-phase buffer (false: the rollout
    decodes sharded, with the training phase's gathered copy only).
    A quantized base is refused: bitsandbytes' Params4bit / Int8Params cannot be sharded by
    fully_shard (the trainer refuses the 4-bit base).
  * DeepSpeed ZeRO-2 (zero_stage 2; DeepSpeedZeroOptimizer): weights replicated; the trainable
    parameters flattened and split evenly, ceil(P / N) per rank, as an fp32 master partition
    (4 bytes each, a copy even when they are fp32 already), AdamW's states on that partition
    (so in fp32), and the gradient partition (g bytes). In each backward a contiguous reduce
    bucket of reduce_bucket_size elements x g (contiguous_gradients defaults to true; a second
    one with overlap_comm, which defaults to false below stage 3). accelerate's config file
    writes no bucket sizes, so DeepSpeed's defaults hold (deepspeed/runtime/zero/config.py,
    the zero_optimization reference at deepspeed.ai/docs/config-json): reduce_bucket_size and
    allgather_bucket_size 5e8 elements. The all-gather of the updated weights after the step
    writes into the flat weights in place: no buffer of its own.
  * DeepSpeed ZeRO-3 (zero_stage 3): each parameter partitioned, ceil(numel / N) elements per
    rank; parameters under stage3_param_persistence_threshold = 1e5 elements stay whole on every
    rank besides (norms, biases, small adapters). A quantized linear's packed bytes are
    partitioned, its scales (no parameter) replicated. Master partition, AdamW states and
    gradient partition as for ZeRO-2 but per parameter; one reduce bucket (reduce_bucket_size
    elements x g). Gathered working copy: the root's full parameters (as for FSDP2: the log-prob
    kernel reads the LM head) plus the decoder layer running and what is fetched ahead of it,
    stage3_prefetch_bucket_size = 5e7 elements, all capped by stage3_max_live_parameters = 1e9.
  * A frozen reference copy (full fine-tuning with beta > 0) is taken to be sharded like the
    policy under FSDP2 / ZeRO-3, with its own gathered working copy (an upper bound: its root
    stays gathered after its no-grad forward).
  * vLLM: a colocated engine (online.vllm_mode colocate) is refused by the trainer under several
    processes; with vllm_mode server the engine runs on other GPUs and the trainer's carry none.

Not modelled: the optimizer step's transients (ZeRO's fp32 copy of the gradient partition, the
step's own temporaries: after the activations are freed); FSDP2's all-gather output buffer
while it is copied out into the layer's parameters; NCCL's own buffers (a few hundred MiB,
outside torch's allocator: inside CUDA_OVERHEAD's slack only in part).

Tests: tests/test_plan_distributed.py (the FSDP2 shards against fully_shard's on two CPU ranks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import distributed
from ..config import Config, ConfigError
from .engine import uses_engine
from .params import Tensor, layer_tensors, optimizer_bytes, root_tensors
from .shapes import ModelShape

# DeepSpeed's zero_optimization defaults (deepspeed/runtime/zero/config.py), in elements.
REDUCE_BUCKET_SIZE = 500_000_000
STAGE3_PREFETCH_BUCKET_SIZE = 50_000_000
STAGE3_MAX_LIVE_PARAMETERS = 1_000_000_000
STAGE3_PERSISTENCE_THRESHOLD = 100_000
# ZeRO-3 runs the optimizer over the partition in sub-groups of this many elements.
SUB_GROUP_SIZE = 1_000_000_000

# FSDP2 with reshard_after_forward: the layer running and the one prefetched.
FSDP_GATHERED_LAYERS = 2

# ZeRO keeps its master partition, and AdamW's states on it, in fp32.
FP32 = 4

STRATEGIES = {"ddp": "DDP", "fsdp2": "FSDP2", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}
SHARDED = ("fsdp2", "zero3")


@dataclass(frozen=True)
class Parallelism:
    """How the run is launched: `strategy` (a key of STRATEGIES) over `num_processes` GPUs."""

    strategy: str
    num_processes: int
    reshard_after_forward: bool = True
    source: str = ""  # the accelerate file, or "--num-processes"

    @property
    def label(self) -> str:
        return STRATEGIES[self.strategy]


def _error(path: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"--accelerate-config: {path}: {key}: {problem}")


def read_accelerate_config(path: str, num_processes: Optional[int] = None) -> Parallelism:
    """The Parallelism an accelerate config file (configs/accelerate/*.yaml) launches, on
    `num_processes` instead of the file's count when given; raises a one-line ConfigError naming
    the file and key for what the planner cannot plan."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--accelerate-config: cannot read {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--accelerate-config: {path} is not a YAML mapping of accelerate's keys")
    n = data.get("num_processes", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise _error(path, "num_processes", f"expected a positive integer, got {n!r}")
    n = n if num_processes is None else num_processes
    if data.get("use_cpu"):
        raise _error(path, "use_cpu", "the planner plans GPUs")
    if str(data.get("mixed_precision", "no")) != "no":
        raise _error(path, "mixed_precision", f"{data['mixed_precision']!r}: the planner plans the config's "
                     "dtype, as accelerate runs it with mixed_precision: no")
    kind = data.get("distributed_type", "NO")
    if kind == "NO":
        if n > 1:
            raise _error(path, "distributed_type", f"NO runs one process, not {n}")
        return Parallelism("ddp", 1, source=path)
    if kind == "MULTI_GPU":
        return Parallelism("ddp", n, source=path)
    if kind == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        checks = {"fsdp_version": (2, "only FSDP2 (fully_shard) is planned"),
                  "fsdp_auto_wrap_policy": ("TRANSFORMER_BASED_WRAP", "one unit per decoder layer is planned"),
                  "fsdp_offload_params": (False, "CPU offload is not planned"),
                  "fsdp_activation_checkpointing": (False, "use the training config's gradient_checkpointing")}
        for key, (expected, why) in checks.items():
            if fsdp.get(key, expected) != expected:
                raise _error(path, f"fsdp_config.{key}", f"{fsdp[key]!r}: {why} ({expected!r})")
        if "fsdp_version" not in fsdp:
            raise _error(path, "fsdp_config.fsdp_version", "missing; the planner plans fsdp_version: 2")
        return Parallelism("fsdp2", n, reshard_after_forward=bool(fsdp.get("fsdp_reshard_after_forward", True)),
                           source=path)
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        if "deepspeed_config_file" in ds:
            raise _error(path, "deepspeed_config.deepspeed_config_file", "not read by the planner, which plans "
                         "DeepSpeed's defaults for zero_stage 2 or 3")
        stage = ds.get("zero_stage")
        if stage not in (2, 3):
            raise _error(path, "deepspeed_config.zero_stage", f"{stage!r}: the planner plans ZeRO stage 2 or 3")
        for key in ("offload_optimizer_device", "offload_param_device"):
            if str(ds.get(key, "none")) != "none":
                raise _error(path, f"deepspeed_config.{key}", f"{ds[key]!r}: offload is not planned (none)")
        return Parallelism(f"zero{stage}", n, source=path)
    raise _error(path, "distributed_type", f"{kind!r}: the planner plans MULTI_GPU, FSDP or DEEPSPEED")


def parallelism(accelerate_config: Optional[str] = None,
                num_processes: Optional[int] = None) -> Optional[Parallelism]:
    """The launch of `--accelerate-config` / `--num-processes` (which overrides the file's count;
    alone it means DDP); None without either."""
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes: expected a positive integer, got {num_processes}")
    if accelerate_config is None:
        return None if num_processes is None else Parallelism("ddp", num_processes, source="--num-processes")
    return read_accelerate_config(accelerate_config, num_processes)


def check(cfg: Config, par: Parallelism) -> None:
    """What the trainer refuses under several processes: one line each (ConfigError)."""
    if uses_engine(cfg):
        raise ConfigError(f"online.generation_backend: a colocated vLLM engine is refused by the trainer under "
                          f"{par.num_processes} processes; use hf, or online.vllm_mode: server (the engine on "
                          "other GPUs)")
    try:
        distributed.check(cfg, par.num_processes, par.strategy)
    except ValueError as e:
        raise ConfigError(f"{e} (the trainer refuses it)") from None


def fsdp_local_rows(rows: int, n: int, rank: Optional[int] = None) -> int:
    """Rows of dim 0 a rank holds under fully_shard (torch.chunk's split); rank None: the
    padded size every rank allocates (rank 0's)."""
    chunk = -(-rows // n)
    return chunk if rank is None else max(0, min(chunk, rows - rank * chunk))


def fsdp_shard_bytes(t: Tensor, n: int, rank: Optional[int] = None) -> int:
    return fsdp_local_rows(t.rows, n, rank) * t.cols * t.element_bytes + t.side_bytes


def fsdp_weight_bytes(cfg: Config, shape: ModelShape, n: int, rank: Optional[int] = None) -> int:
    """Bytes of every parameter's local shard under FSDP2 (base and LoRA), on `rank` (None: the
    padded per-GPU storage)."""
    layers = sum(fsdp_shard_bytes(t, n, rank) for t in layer_tensors(cfg, shape))
    return shape.num_layers * layers + sum(fsdp_shard_bytes(t, n, rank) for t in root_tensors(cfg, shape))


def _zero3_bytes(t: Tensor, n: int) -> int:
    """A parameter under ZeRO-3: its partition, its scales, and its whole self when small."""
    persistent = t.numel * t.element_bytes if t.numel < STAGE3_PERSISTENCE_THRESHOLD else 0
    return math.ceil(t.numel / n) * t.element_bytes + t.side_bytes + persistent


def per_gpu(cfg: Config, shape: ModelShape, plan, par: Parallelism):
    """The MemoryPlan `plan` of one process, as each of par.num_processes GPUs holds it (module
    docstring); the plan itself with one process."""
    n = par.num_processes
    if n == 1:
        return plan
    check(cfg, par)
    L = shape.num_layers
    layer, root = layer_tensors(cfg, shape), root_tensors(cfg, shape)
    tensors = layer * L + root
    trainable = [t for t in tensors if t.trainable]
    grad_bytes = trainable[0].element_bytes
    full_layer = sum(t.nbytes for t in layer)
    if par.strategy == "ddp":
        return dataclasses.replace(plan, parallel=par, ddp_buckets=plan.gradients)
    if par.strategy == "zero2":
        part = -(-sum(t.numel for t in trainable) // n)
        return dataclasses.replace(
            plan, parallel=par, master_weights=part * FP32, optimizer_states=optimizer_bytes(cfg, [part], FP32),
            gradients=part * grad_bytes, reduce_buffer=REDUCE_BUCKET_SIZE * grad_bytes)
    if par.strategy == "fsdp2":
        weights = sum(fsdp_shard_bytes(t, n) for t in tensors if not t.lora)
        gathered_layers = min(L, FSDP_GATHERED_LAYERS) if par.reshard_after_forward else L
        # The reference (full fine-tuning, no adapters) gathers the same tensors.
        gathered = (sum(t.nbytes for t in root) + gathered_layers * full_layer) * (2 if plan.reference_weights else 1)
        local = [fsdp_local_rows(t.rows, n) * t.cols for t in trainable]
        # A gathered rollout (online hf, ds3_gather_for_generation) holds every unit whole.
        policy_gathered = sum(t.nbytes for t in root) + gathered_layers * full_layer
        whole = (cfg.mode == "online" and plan.generation > 0 and cfg.online.ds3_gather_for_generation)
        rollout = sum(t.nbytes for t in tensors) - policy_gathered if whole else 0
        return dataclasses.replace(
            plan, parallel=par, weights=weights, reference_weights=weights if plan.reference_weights else 0,
            lora_params=sum(fsdp_shard_bytes(t, n) for t in tensors if t.lora), gathered_weights=gathered,
            rollout_gathered=rollout,
            optimizer_states=optimizer_bytes(cfg, local, grad_bytes), gradients=sum(local) * grad_bytes,
            reduce_buffer=sum(t.nbytes for t in layer if t.trainable))
    # zero3
    base = [t for t in tensors if not t.lora]
    weights = sum(_zero3_bytes(t, n) for t in base)
    layer_numel = sum(t.numel for t in layer)
    live = min(STAGE3_MAX_LIVE_PARAMETERS, layer_numel + STAGE3_PREFETCH_BUCKET_SIZE, L * layer_numel)
    gathered = (sum(t.nbytes for t in root) + live * full_layer // layer_numel) * (2 if plan.reference_weights else 1)
    parts = [math.ceil(t.numel / n) for t in trainable]
    total = sum(parts)
    groups = [min(SUB_GROUP_SIZE, total - start) for start in range(0, total, SUB_GROUP_SIZE)]
    return dataclasses.replace(
        plan, parallel=par, weights=weights, reference_weights=weights if plan.reference_weights else 0,
        lora_params=sum(_zero3_bytes(t, n) for t in tensors if t.lora), gathered_weights=gathered,
        master_weights=total * FP32, optimizer_states=optimizer_bytes(cfg, groups, FP32),
        gradients=total * grad_bytes, reduce_buffer=REDUCE_BUCKET_SIZE * grad_bytes)
