"""The model's parameters as the trainer stores them: bytes of the (quantized) weights, the
trainable tensors, AdamW's states, and the tensor-by-tensor inventory that sharding works on.

    from grpo_fast.plan.params import layer_tensors, root_tensors, weight_bytes
    weight_bytes(cfg, shape)                     # every base weight, bytes
    [t.numel for t in layer_tensors(cfg, shape)] # one decoder layer's tensors (x num_layers)

The formulas (NF4 / 8-bit storage, AdamW states, what is trainable) are derived in
grpo_fast.plan.formulas' docstring; the inventory follows transformers' Llama modules: a
linear's weight is (out_features, in_features), so its dim 0 is out_features; a LoRA adapter is
A (r, in) and B (out, r); norms and biases are one row each of their width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Config
from .inputs import DTYPE_BYTES, lora_targets, planned_dtype, precision
from .shapes import ModelShape

# bitsandbytes: 4-bit block size, double-quantization block size (over the absmax values),
# 8-bit optimizer block size and the size under which it keeps fp32 states.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
OPTIM_8BIT_BLOCK = 256
OPTIM_8BIT_MIN_SIZE = 4096


def quantized_linear_bytes(numel: int, out_features: int, cfg: Config) -> float:
    """Bytes of one linear weight as bitsandbytes stores it (see formulas' docstring)."""
    q = cfg.quantization
    if q.load_in_4bit:
        blocks = math.ceil(numel / NF4_BLOCK)
        if q.double_quant:
            scales = blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)
        else:
            scales = 4 * blocks
        return numel / 2 + scales
    if q.load_in_8bit:
        return numel + 4 * out_features
    return numel * DTYPE_BYTES[planned_dtype(cfg)]


def weight_bytes(cfg: Config, shape: ModelShape) -> int:
    p = precision(cfg)
    linears = shape.num_layers * sum(quantized_linear_bytes(a * b, b, cfg)
                                     for a, b in shape.linear_shapes().values())
    return int(linears + shape.unquantized_params * p.weight)


def optimizer_bytes(cfg: Config, tensor_sizes: list[int], param_bytes: int) -> int:
    """AdamW's two states for tensors of these sizes (elements) whose parameters take
    `param_bytes` bytes an element."""
    total = 0
    for n in tensor_sizes:
        if cfg.optim != "adamw_torch" and n >= OPTIM_8BIT_MIN_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / OPTIM_8BIT_BLOCK)
        elif cfg.optim != "adamw_torch":
            total += 2 * 4 * n  # bitsandbytes keeps small tensors' states in fp32
        else:
            total += 2 * param_bytes * n  # torch AdamW: states in the parameter's dtype
    return total


def trainable_tensor_sizes(cfg: Config, shape: ModelShape) -> list[int]:
    """Elements of every trainable tensor (the LoRA adapters, or with full fine-tuning every
    weight), in no particular order."""
    return [t.numel for t in layer_tensors(cfg, shape) if t.trainable] * shape.num_layers + \
        [t.numel for t in root_tensors(cfg, shape) if t.trainable]


@dataclass(frozen=True)
class Tensor:
    """One parameter: `rows` along dim 0 (what FSDP2 shards) x `cols` elements in the rest, of
    `element_bytes` each; `side_bytes`: storage that goes with it but is no parameter of its own
    (bitsandbytes' quantization scales), never sharded."""

    name: str
    rows: int
    cols: int
    element_bytes: int
    trainable: bool
    lora: bool = False
    side_bytes: int = 0

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_bytes + self.side_bytes


def _linear(cfg: Config, name: str, fan_in: int, fan_out: int, w: int, full_ft: bool) -> Tensor:
    """A base linear's weight. Quantized, bitsandbytes keeps it as one packed byte tensor (4-bit:
    two weights a byte, shape (numel / 2, 1); 8-bit: int8 (out, in)) plus its scales."""
    q, numel = cfg.quantization, fan_in * fan_out
    if q.load_in_4bit:
        packed = numel // 2
        return Tensor(name, packed, 1, 1, False, side_bytes=int(quantized_linear_bytes(numel, fan_out, cfg)) - packed)
    if q.load_in_8bit:
        return Tensor(name, fan_out, fan_in, 1, False, side_bytes=4 * fan_out)
    return Tensor(name, fan_out, fan_in, w, full_ft)


def layer_tensors(cfg: Config, shape: ModelShape) -> list[Tensor]:
    """One decoder layer's parameters: the linears, their biases, both norms, the LoRA adapters."""
    p, full_ft = precision(cfg), not cfg.lora.enabled
    w, h, i = p.weight, shape.hidden_size, shape.intermediate_size
    dims = shape.linear_shapes()
    tensors = [_linear(cfg, m, a, b, w, full_ft) for m, (a, b) in dims.items()]
    biases = ([("q_proj", shape.q_dim), ("k_proj", shape.kv_dim), ("v_proj", shape.kv_dim)] * shape.qkv_bias
              + [("o_proj", h)] * shape.o_bias
              + [("gate_proj", i), ("up_proj", i), ("down_proj", h)] * shape.mlp_bias)
    tensors += [Tensor(f"{m}.bias", n, 1, w, full_ft) for m, n in biases]
    tensors += [Tensor(f"{norm}.weight", h, 1, w, full_ft) for norm in ("input_layernorm", "post_attention_layernorm")]
    r = cfg.lora.r
    for m in lora_targets(cfg):
        a, b = dims[m]
        tensors += [Tensor(f"{m}.lora_A", r, a, p.lora, True, lora=True),
                    Tensor(f"{m}.lora_B", b, r, p.lora, True, lora=True)]
    return tensors


def root_tensors(cfg: Config, shape: ModelShape) -> list[Tensor]:
    """What lies outside the decoder layers: the embeddings, the LM head when untied, the final
    norm (never quantized)."""
    w, full_ft = precision(cfg).weight, not cfg.lora.enabled
    V, h = shape.vocab_size, shape.hidden_size
    tensors = [Tensor("embed_tokens.weight", V, h, w, full_ft)]
    if not shape.tie_word_embeddings:
        tensors.append(Tensor("lm_head.weight", V, h, w, full_ft))
    return tensors + [Tensor("norm.weight", h, 1, w, full_ft)]
