r"""What a training config implies for GPU memory: bytes per element of each kind of tensor
(`Precision`), the micro-batch (`Workload`), the attention kernel and the LoRA targets.

    from grpo_fast.plan.inputs import precision, workload
    precision(cfg).stream, workload(cfg).tokens

Precision, as grpo_fast.modeling sets it up on a CUDA device (dtype auto = bfloat16, since
the planned card is taken to be Ampere or newer):
  * weights and stream take the bytes of `dtype`, quantized or not: for 4/8-bit,
    grpo_fast.modeling only freezes the base (no peft `prepare_model_for_kbit_training`, which
    would upcast every unquantized parameter and with it the whole residual stream to float32),
    so embeddings, LM head, norms and biases keep the model dtype, and every quantized linear
    returns its input's dtype.
  * LoRA adapters stay float32 (peft's autocast_adapter_dtype), 4 bytes: with a bf16 stream peft
    casts each adapted linear's input to fp32.
  * FlashAttention-2 keeps q, k, v and its output in half precision whatever the stream.

The attention choice mirrors grpo_fast.modeling.resolve_attn_implementation for a CUDA device
with this machine's packages, except that `flash_attention_2` asked for by name is planned for
the machine that will run it: flash_attn need not be installed where the plan is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Config, ConfigError
from ..modeling import resolve_attn_implementation, resolve_dtype
from .shapes import LINEARS, ModelShape

# Only its type matters: nothing is allocated or initialized on it.
PLANNED_DEVICE = torch.device("cuda")

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

GiB = 1 << 30


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor (see the module docstring)."""

    weight: int    # unquantized parameters: embeddings, LM head, norms, biases
    stream: int    # activations: the residual stream and what is computed from it
    lora: int      # LoRA adapters, their gradients, and peft's casts of their inputs
    attention: int  # q / k / v / output saved by the attention kernel
    compute: int   # bitsandbytes' dequantized matmul dtype


@dataclass(frozen=True)
class Workload:
    """One micro-batch: S sequences of prompt + completion tokens."""

    sequences: int
    prompt_tokens: int
    completion_tokens: int
    generates: bool  # online rollouts (a KV cache) or offline scored data (none)

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_len

    @property
    def scored_tokens(self) -> int:
        # Offline completions fill max_seq_length with no known prompt split: all tokens.
        return self.sequences * (self.completion_tokens if self.generates else self.seq_len)


def quantized(cfg: Config) -> bool:
    return cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit


def planned_dtype(cfg: Config) -> str:
    """The weights dtype on the GPU being planned for: `auto` is bfloat16 there (Ampere or newer)."""
    dtype = resolve_dtype(cfg.dtype, PLANNED_DEVICE, bf16_supported=True)
    return str(dtype).removeprefix("torch.")


def planned_attention(cfg: Config) -> tuple[str, str]:
    """(implementation, reason) as grpo_fast.modeling picks it on the planned CUDA card. Asked for
    by name, flash_attention_2 is planned for the machine that will run it: flash_attn need not
    be installed here."""
    has_flash = True if cfg.attn_implementation == "flash_attention_2" else None
    dtype = resolve_dtype(cfg.dtype, PLANNED_DEVICE, bf16_supported=True)
    return resolve_attn_implementation(cfg.attn_implementation, PLANNED_DEVICE, dtype, has_flash=has_flash)


def precision(cfg: Config) -> Precision:
    """Bytes per element of each kind of tensor the config produces on a GPU (module docstring)."""
    weights = DTYPE_BYTES[planned_dtype(cfg)]
    attn, _ = planned_attention(cfg)
    return Precision(weight=weights, stream=weights, lora=4,
                     attention=2 if attn == "flash_attention_2" else weights,
                     compute=DTYPE_BYTES[cfg.quantization.compute_dtype] if quantized(cfg) else weights)


def lora_targets(cfg: Config) -> tuple[str, ...]:
    """The block's linear layers LoRA adapts (empty without LoRA)."""
    if not cfg.lora.enabled:
        return ()
    targets = cfg.lora.target_modules
    if targets == "all-linear":
        return LINEARS
    names = [targets] if isinstance(targets, str) else list(targets)
    # peft matches module names by suffix: "self_attn.q_proj" adapts q_proj.
    chosen = {n.rsplit(".", 1)[-1] for n in names}
    unknown = sorted(chosen - set(LINEARS))
    if unknown:
        raise ConfigError(f"lora.target_modules: the planner models LoRA on {', '.join(LINEARS)} "
                          f"(or all-linear); cannot plan for {', '.join(unknown)}")
    return tuple(m for m in LINEARS if m in chosen)


def lora_param_count(cfg: Config, shape: ModelShape, rank: Optional[int] = None) -> int:
    """Parameters of the config's LoRA adapters, at lora.r or at `rank` (a vLLM slot's rank)."""
    r = cfg.lora.r if rank is None else rank
    dims = shape.linear_shapes()
    return shape.num_layers * sum(r * (dims[m][0] + dims[m][1]) for m in lora_targets(cfg))


def workload(cfg: Config, group_size: Optional[int] = None) -> Workload:
    """The micro-batch of the config. Offline needs `group_size` (completions per group)."""
    if cfg.mode == "online":
        o = cfg.online
        return Workload(cfg.batch_size * o.num_generations, o.max_prompt_length,
                        o.max_completion_length, generates=True)
    if group_size is None:
        raise ValueError("offline plans need group_size, the completions per group")
    return Workload(cfg.batch_size * group_size, 0, cfg.max_seq_length, generates=False)


def scores_without_grad(cfg: Config) -> bool:
    """Whether a step runs a no-grad reference or old-policy forward before training."""
    if cfg.mode == "online":
        return cfg.online.beta > 0 or cfg.online.num_iterations > 1
    return cfg.offline.beta > 0
