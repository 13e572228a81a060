r"""VRAM planner: peak GPU memory of a training config, estimated before anything is downloaded
or allocated.

    grpo-fast plan --config configs/qwen2.5-1.5b-gsm8k-qlora.yaml --gpu-memory 12GiB

    from grpo_fast.plan import estimate, model_shape
    plan = estimate(cfg, model_shape(cfg.model_path))   # MemoryPlan, byte counts
    plan.total, plan.allocated

The model's shape comes from its config only: a shipped `configs/models/*.json`, a local
directory's `config.json`, the Hugging Face cache (`local_files_only`), or a hub id of a shipped
shape (`HUB_SHAPES`). The arithmetic assumes a Llama-style decoder (Llama, Qwen2, Mistral):
RMSNorm, GQA attention with RoPE, SwiGLU MLP (gate/up/down), optional untied LM head.

Notation (per micro-batch): S sequences (online: batch_size prompts x num_generations; offline:
batch_size groups x K completions), T = prompt + completion tokens each, n = S x T tokens,
n_c = S x completion tokens (the tokens whose log-probs are scored; offline: all n), L layers,
h hidden, i intermediate, q = heads x head_dim, kv = kv_heads x head_dim, a heads, V vocab,
r LoRA rank. Bytes: s activations ("stream"), w unquantized weights, l LoRA adapters (4).

Online log-prob forwards run each distinct prompt once by default (`online.shared_prompt`):
the prompt's layers then work on batch_size x P tokens instead of S x P, while attention still
saves S x T keys and values. The planner counts the unshared forward (n tokens everywhere), an
upper bound: sharing lowers the training and scoring phases, never raises them.

Precision, mirroring grpo_fast.modeling on a CUDA device (dtype auto = bfloat16):
  * w = s = bytes of `dtype`, quantized or not: for 4/8-bit, grpo_fast.modeling only freezes
    the base (no peft `prepare_model_for_kbit_training`, which would upcast every unquantized
    parameter and with it the whole residual stream to float32), so embeddings, LM head, norms
    and biases keep the model dtype, and every quantized linear returns its input's dtype.
  * LoRA adapters stay float32 (peft's autocast_adapter_dtype), l = 4: with a bf16 stream peft
    casts each adapted linear's input to fp32.

Resident for the whole run:
  * Base weights. NF4/FP4: 0.5 byte/param + one absmax per 64-weight block: fp32 (4/64 byte
    per param), or with double quantization uint8 plus one fp32 per 256 blocks
    (8/64 + 32/(64*256) bits = 0.127 bit/param). 8-bit: 1 byte/param + one fp32 scale per
    output row. Only the decoder's linear layers are quantized; embeddings, the LM head
    (skipped so the log-prob kernel reads it directly), norms and biases take w bytes.
  * LoRA: r x (in + out) params per adapted linear x L; params l bytes; AdamW (adamw_torch)
    two fp32 states = 8 bytes/param; bitsandbytes 8-bit AdamW: 2 bytes/param + two fp32
    absmax per 256 (tensors under 4,096 elements keep fp32 states, as bitsandbytes does).
    Full fine-tuning (lora.enabled false): every weight trainable; AdamW states in the weight
    dtype (2 x w per param), gradients w per param; with beta > 0 a frozen reference copy.
  * Dequantization buffer: the largest quantized linear in max(compute dtype, s): bitsandbytes
    dequantizes one weight at a time (forward in the compute dtype, backward in the gradient's).
  * CUDA context + caching-allocator slack: CUDA_OVERHEAD = 0.5 GiB (context ~0.3-0.4 GiB on
    current drivers with lazy module loading, plus fragmentation). Not seen by
    `torch.cuda.max_memory_allocated`; `MemoryPlan.allocated` leaves it out for that comparison.

Phases; the peak is resident + the largest phase (the caching allocator reuses a phase's blocks
in the next):
  * Rollout (no grad, online only): KV cache 2 x L x kv x s bytes per token (k and v of every
    layer, in the stream dtype) for S x T tokens; plus the larger of the prefill (cache for S x P
    prompt tokens + one layer's working set) and the last decode step (full cache + a copy of
    one layer's k or v from DynamicCache's torch.cat + sampling: S x V x 4 bytes x 4 for the fp32
    logits and the temperature / top-p copies; generate computes logits for the last position
    only). The no-grad forward's working set peaks in the last layer's up_proj adapter:
    n x (4 s h + 2 s head_dim + 2 s i + 2 l i + l h) + S x T^2: the embedding output (the model
    keeps it), the layer's input, the residual and the normed MLP input; RoPE's cos and sin; the
    SiLU output and the base output's clone (peft's bitsandbytes layer clones it); the LoRA-B
    output and its scaled copy; peft's cast of the input to l (none when s = l); the model's
    boolean attention mask (none for FlashAttention-2). Matches the CPU profiler within 0.3%.
  * Scoring (no grad; online with beta > 0 or num_iterations > 1, offline with beta > 0): the
    reference / old-policy forward over the micro-batch: one layer's working set + the final
    hidden states n x s x h + the log-prob kernel.
  * Training forward + backward on the micro-batch (n tokens). Saved for backward per layer per
    token (no (T x T) attention matrix: SDPA's memory-efficient kernel and FlashAttention-2 save
    only q, k, v, the output and a log-sum-exp per head):
        norms        2 x 4h                  both RMSNorms keep their input upcast to fp32
                                             (+ 2 x s x h when the norm weights train)
        linear in    per input group (q/k/v share the normed input, o the attention output,
                     gate/up the second normed input, down the SwiGLU product): peft casts the
                     input to the adapter dtype once per adapter, so a group costs its input
                     (s bytes, saved once) when s = l and one l-byte copy per adapted module
                     otherwise; plus r x l per adapter (the LoRA-A output). o's input is a view
                     of the attention output, already saved by the kernel: it costs only the
                     copies. Base linears are frozen, so their inputs are not saved (full
                     fine-tuning: each group's input once).
        attention    c x (2q + 2kv') + 4a    q, k, v, output (+ fp32 log-sum-exp); c = 2 for
                     FlashAttention-2 (it runs in half precision), else s; kv' = kv for FA2,
                     q for SDPA, which repeats k/v across the head groups when a padding mask
                     is present (GRPO batches always pad)
        MLP          3 x s x i               SiLU input, SiLU output, up projection
        + per sequence, per layer: SDPA's float padding mask T^2 x s; eager attention also the
          softmax probabilities a x T^2 x (4 + s).
      For Qwen2.5-1.5B under QLoRA (s = 2, SDPA, T = 768) that is 153 KB per token per layer.
      Without checkpointing: L x that. With gradient checkpointing (non-reentrant, per decoder
      layer): each layer keeps only its input, L x n x s x h, and one layer is recomputed during
      backward: + one layer's saved tensors. Both add the final norm's fp32 input, n x 4h.
      Backward working set: n x (max(s, l) x i + s x h), the gradient of the largest
      intermediate (the down projection's input) and of the residual stream, allocated before the
      saved tensors they replace are freed (autograd frees each node's saved tensors as soon as
      its backward has run, so the backward adds little to the end-of-forward peak).
      Gradients: LoRA params x l bytes (full fine-tuning: every weight, w bytes).
      Training phase = activations + gradients + max(log-prob step, backward working set): the
      log-prob step's memory lives at the end of the forward and is freed first in the backward.
  * Log-prob step: the fused kernel (grpo_fast.kernels) needs nothing vocabulary-sized: per
    scored token the hidden state it reads (n_c x w x h, cast to the LM head's dtype), its
    gradient (same size) and 16 bytes (log-sum-exp, target, log-prob); the chunked CPU backend
    adds three (chunk x V) fp32 slabs of at most 64 MiB. Full logits (backend naive, or a
    model's own forward) would need n_c x V x 4 bytes x 3 (logits, log_softmax and its
    gradient): shown for comparison.

Not modelled (small): RoPE cos/sin tables, per-module quantization codebooks (~1 KB), the
optimizer step's temporaries (it runs after the activations are freed), rollout token ids and
stored log-probs (S x T x 4 bytes each).

Fit search: the largest num_generations, max_completion_length and batch_size (each with the
others fixed) whose total fits the card; the total grows monotonically in each.

Tests: tests/test_plan.py: the arithmetic on known shapes; the per-layer formula against the
tensors autograd actually saves; the rollout and training phases against the CPU profiler's
peak of a small QLoRA model (generation within 3%; training an upper bound within 25%).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import Config, ConfigError

GiB = 1 << 30

# CUDA context (~0.3-0.4 GiB with lazy module loading) + caching-allocator fragmentation.
CUDA_OVERHEAD = GiB // 2

# bitsandbytes: 4-bit block size, double-quantization block size (over the absmax values),
# 8-bit optimizer block size and the size under which it keeps fp32 states.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
OPTIM_8BIT_BLOCK = 256
OPTIM_8BIT_MIN_SIZE = 4096

# The sampler's copies of the last-position logits: fp32 logits, temperature-scaled logits,
# top-p's sorted values and int64 indices.
SAMPLING_COPIES = 4

# Full logits need the logits, their log_softmax and its gradient, all fp32.
FULL_LOGITS_COPIES = 3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

SHAPES_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"

# Hub ids (lower case) whose shape ships in configs/models/; base and Instruct share a shape.
HUB_SHAPES = {
    f"{repo}{suffix}".lower(): f"{name}.json"
    for repo, name in (
        ("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b"),
        ("Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b"),
        ("Qwen/Qwen2.5-3B", "qwen2.5-3b"),
        ("Qwen/Qwen2.5-7B", "qwen2.5-7b"),
        ("meta-llama/Llama-3.2-1B", "llama-3.2-1b"),
        ("meta-llama/Llama-3.2-3B", "llama-3.2-3b"),
    )
    for suffix in ("", "-Instruct")
}

# The linear layers of a Llama-style block, grouped by the input they share.
ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
LINEARS = ATTN_IN + ("o_proj",) + MLP_IN + ("down_proj",)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a Llama-style decoder's config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 0
    model_type: str = "llama"
    # Where the shape was read from, for the report.
    source: str = dataclasses.field(default="", compare=False)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def unquantized_params(self) -> int:
        """Embeddings, LM head (when untied), norms and biases: never quantized."""
        h = self.hidden_size
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        norms = (2 * self.num_layers + 1) * h
        bias = (self.qkv_bias * (self.q_dim + 2 * self.kv_dim) + self.o_bias * h
                + self.mlp_bias * (2 * self.intermediate_size + h))
        return embeddings + norms + self.num_layers * bias

    @property
    def num_params(self) -> int:
        return self.num_layers * self.linear_params_per_layer + self.unquantized_params


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


@dataclass(frozen=True)
class MemoryPlan:
    """Peak GPU memory of one training step, in bytes, by component."""

    # resident
    weights: int
    reference_weights: int
    lora_params: int
    optimizer_states: int
    dequant_buffer: int
    cuda_overhead: int
    # rollout (no grad)
    kv_cache: int
    generation_workspace: int
    # reference / old-policy log-probs (no grad)
    scoring: int
    # training forward + backward
    activations_checkpointed: int
    activations_full: int
    gradient_checkpointing: bool
    backward_workspace: int
    gradients: int
    logprob_step: int
    # what full logits would need instead of logprob_step (not counted)
    full_logits: int

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations_full

    @property
    def resident(self) -> int:
        return (self.weights + self.reference_weights + self.lora_params + self.optimizer_states
                + self.dequant_buffer + self.cuda_overhead)

    @property
    def generation(self) -> int:
        return self.kv_cache + self.generation_workspace

    @property
    def training(self) -> int:
        # The log-prob step's memory peaks at the end of the forward and is freed first in the
        # backward, before the layers' backward working set exists.
        return self.activations + self.gradients + max(self.logprob_step, self.backward_workspace)

    @property
    def total(self) -> int:
        return self.resident + max(self.generation, self.scoring, self.training)

    @property
    def allocated(self) -> int:
        """The total as `torch.cuda.max_memory_allocated` sees it (no context, no slack)."""
        return self.total - self.cuda_overhead


# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------


def shape_from_config(config, source: str = "") -> ModelShape:
    """ModelShape of a transformers config (or a plain dict of config.json fields)."""
    if isinstance(config, dict):
        config = config.get("text_config") or config
        get = config.get
        model_type = config.get("model_type", "")
    else:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = getattr(config, "model_type", "")

        def get(key, default=None):
            return getattr(config, key, default)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if get(k) is None]
    if missing:
        raise ConfigError(f"model_path: {source or 'the model config'} lacks {', '.join(missing)}; "
                          "the planner needs a Llama-style decoder config")
    if get("num_experts") or get("num_local_experts"):
        raise ConfigError(f"model_path: {source} is a mixture-of-experts model; the planner models "
                          "dense Llama-style decoders only")
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    attention_bias = bool(get("attention_bias", False))
    # Qwen2 hard-codes biases on q/k/v (not o); Llama-style configs say so in attention_bias.
    qwen2 = model_type == "qwen2"
    return ModelShape(
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(get("intermediate_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or hidden // heads),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=qwen2 or attention_bias,
        o_bias=attention_bias and not qwen2,
        mlp_bias=bool(get("mlp_bias", False)),
        max_position_embeddings=int(get("max_position_embeddings") or 0),
        model_type=model_type or "llama",
        source=source,
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model_path: cannot read model config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model_path: {path} is not a JSON object")
    return data


def _cached_config(model_path: str) -> Optional[Path]:
    """config.json of a hub model in the local Hugging Face cache, never touching the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_path, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def model_shape(model_path: str) -> ModelShape:
    """The shape of `model_path`, read without downloading or allocating anything: a config file
    (configs/models/*.json), a local checkpoint directory, the Hugging Face cache, or a hub id
    with a shipped shape (HUB_SHAPES). Raises ConfigError saying what was tried.

    config.json is read as plain JSON, without importing transformers; fields a config may leave
    out take transformers' Llama defaults (kv heads = heads,
    head_dim = hidden / heads, untied embeddings)."""
    path = Path(model_path)
    if path.is_file():
        return shape_from_config(_read_json(path), source=str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model_path: {model_path} is a directory without config.json")
        return shape_from_config(_read_json(path / "config.json"), source=str(path / "config.json"))
    cached = _cached_config(model_path)
    if cached is not None:
        return shape_from_config(_read_json(cached), source=f"{model_path} (Hugging Face cache)")
    shipped = HUB_SHAPES.get(model_path.lower())
    if shipped is not None and (SHAPES_DIR / shipped).is_file():
        return shape_from_config(_read_json(SHAPES_DIR / shipped), source=f"configs/models/{shipped}")
    known = sorted(k for k in HUB_SHAPES if not k.endswith("-instruct"))
    raise ConfigError(
        f"model_path: no shape for {model_path!r}: it is not a config file, a local directory or a "
        f"model in the Hugging Face cache, and no shape ships for it (shipped: {', '.join(known)} "
        f"and their -Instruct variants). Point model_path at a config.json, or fetch the model's "
        f"config once: huggingface-cli download {model_path} config.json")


# --------------------------------------------------------------------------------------------
# What the config implies
# --------------------------------------------------------------------------------------------


def _quantized(cfg: Config) -> bool:
    return cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit


def planned_dtype(cfg: Config) -> str:
    """The weights dtype on the GPU being planned for: `auto` is bfloat16 there (Ampere or newer)."""
    return "bfloat16" if cfg.dtype == "auto" else cfg.dtype


def planned_attention(cfg: Config) -> tuple[str, str]:
    """(implementation, reason) as grpo_fast.modeling would pick it on a CUDA device."""
    if cfg.attn_implementation == "flash_attention_2" and planned_dtype(cfg) == "float32":
        raise ConfigError("attn_implementation: flash_attention_2 needs dtype bfloat16 or float16")
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation, "requested"
    if planned_dtype(cfg) == "float32":
        return "sdpa", "auto: FlashAttention-2 needs bfloat16 or float16 weights"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "auto: flash_attn is not installed here"
    return "flash_attention_2", "auto: flash_attn installed"


def precision(cfg: Config) -> Precision:
    """Bytes per element of each kind of tensor the config produces on a GPU (module docstring)."""
    # Quantized or not, the unquantized parameters (embeddings, LM head, norms, biases) keep the
    # model dtype: grpo_fast.modeling only freezes a quantized base (no
    # prepare_model_for_kbit_training upcast), so the residual stream stays in that dtype too.
    weights = DTYPE_BYTES[planned_dtype(cfg)]
    attn, _ = planned_attention(cfg)
    return Precision(weight=weights, stream=weights, lora=4,
                     attention=2 if attn == "flash_attention_2" else weights,
                     compute=DTYPE_BYTES[cfg.quantization.compute_dtype] if _quantized(cfg) else weights)


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


def workload(cfg: Config, group_size: Optional[int] = None) -> Workload:
    """The micro-batch of the config. Offline needs `group_size` (completions per group)."""
    if cfg.mode == "online":
        o = cfg.online
        return Workload(cfg.batch_size * o.num_generations, o.max_prompt_length,
                        o.max_completion_length, generates=True)
    if group_size is None:
        raise ValueError("offline plans need group_size, the completions per group")
    return Workload(cfg.batch_size * group_size, 0, cfg.max_seq_length, generates=False)


def _scores_without_grad(cfg: Config) -> bool:
    if cfg.mode == "online":
        return cfg.online.beta > 0 or cfg.online.num_iterations > 1
    return cfg.offline.beta > 0


# --------------------------------------------------------------------------------------------
# The arithmetic
# --------------------------------------------------------------------------------------------


def quantized_linear_bytes(numel: int, out_features: int, cfg: Config) -> float:
    """Bytes of one linear weight as bitsandbytes stores it (see the module docstring)."""
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


def lora_param_count(cfg: Config, shape: ModelShape) -> int:
    r = cfg.lora.r
    dims = shape.linear_shapes()
    return shape.num_layers * sum(r * (dims[m][0] + dims[m][1]) for m in lora_targets(cfg))


def _optimizer_bytes(cfg: Config, tensor_sizes: list[int], param_bytes: int) -> int:
    """AdamW's two states for tensors of these sizes."""
    total = 0
    for n in tensor_sizes:
        if cfg.optim != "adamw_torch" and n >= OPTIM_8BIT_MIN_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / OPTIM_8BIT_BLOCK)
        elif cfg.optim != "adamw_torch":
            total += 2 * 4 * n  # bitsandbytes keeps small tensors' states in fp32
        else:
            total += 2 * param_bytes * n  # torch AdamW: states in the parameter's dtype
    return total


def _trainable_tensor_sizes(cfg: Config, shape: ModelShape) -> list[int]:
    if cfg.lora.enabled:
        r, dims = cfg.lora.r, shape.linear_shapes()
        per_layer = [n for m in lora_targets(cfg) for n in (r * dims[m][0], r * dims[m][1])]
        return per_layer * shape.num_layers
    h, i = shape.hidden_size, shape.intermediate_size
    biases = ([shape.q_dim, shape.kv_dim, shape.kv_dim] * shape.qkv_bias + [h] * shape.o_bias
              + [i, i, h] * shape.mlp_bias)
    per_layer = [a * b for a, b in shape.linear_shapes().values()] + biases + [h, h]
    embeddings = [shape.vocab_size * h] * (1 if shape.tie_word_embeddings else 2)
    return per_layer * shape.num_layers + embeddings + [h]


def layer_activation_bytes_per_token(cfg: Config, shape: ModelShape, seq_len: int) -> float:
    """Bytes one decoder layer saves for backward, per token (formula in the module docstring).
    Terms that grow with the sequence (SDPA's mask, eager's probabilities) are spread over its
    seq_len tokens."""
    p = precision(cfg)
    s, l, c = p.stream, p.lora, p.attention
    h, i, r = shape.hidden_size, shape.intermediate_size, cfg.lora.r
    full_ft = not cfg.lora.enabled
    targets = set(lora_targets(cfg))
    attn, _ = planned_attention(cfg)

    total = 2 * 4 * h  # both RMSNorms save their input upcast to fp32
    if full_ft:
        total += 2 * s * h  # the normalized input, for the norm weights' gradients
    attn_out = 2 if attn == "flash_attention_2" else s
    # (modules, input width, input dtype bytes, whether another op already saves that input):
    # o_proj's input is a view of the attention output, which the attention kernel saves.
    for modules, width, in_bytes, saved_elsewhere in ((ATTN_IN, h, s, False),
                                                      (("o_proj",), shape.q_dim, attn_out, True),
                                                      (MLP_IN, h, s, False),
                                                      (("down_proj",), i, s, False)):
        shared = 0 if saved_elsewhere else in_bytes * width
        if full_ft:
            total += shared
            continue
        adapted = len(targets.intersection(modules))
        if adapted:
            # peft casts the input to the adapter dtype per adapter: a no-op (the input itself,
            # saved once) when it already has that dtype, a separate copy per adapter otherwise.
            total += (shared if in_bytes == l else adapted * l * width) + adapted * l * r
    kv_saved = shape.kv_dim if attn == "flash_attention_2" else shape.q_dim
    total += c * (2 * shape.q_dim + 2 * kv_saved) + 4 * shape.num_heads
    total += 3 * s * i  # SwiGLU: SiLU input and output, up projection
    if attn == "sdpa":
        total += seq_len * s  # the additive float padding mask, one per call
    elif attn == "eager":
        total += seq_len * (s + shape.num_heads * (4 + s))
    return total


def _forward_workspace(cfg: Config, shape: ModelShape, sequences: int, seq_len: int) -> float:
    """The no-grad forward's working set over sequences x seq_len tokens (module docstring)."""
    p = precision(cfg)
    s, l, h, i = p.stream, p.lora, shape.hidden_size, shape.intermediate_size
    n = sequences * seq_len
    # Live through the last layer: the embedding output (the model keeps it), the layer's input,
    # the residual after attention and the normed MLP input; RoPE's cos and sin.
    per_token = 4 * s * h + 2 * s * shape.head_dim
    if "up_proj" in lora_targets(cfg):
        # The peak is in up_proj's adapter (i > h): the SiLU output, the base layer's cloned
        # output, peft's cast of the input to the adapter dtype (none when s = l) and the LoRA-B
        # output with its scaled copy (the LoRA-A output is freed by then).
        per_token += 2 * s * i + 2 * l * i + (l * h if s != l else 0)
    else:
        # Not measured: a bound of SiLU output, up output, their product and one more i-wide copy.
        per_token += 4 * s * i
    total = n * per_token
    if planned_attention(cfg)[0] != "flash_attention_2":
        total += sequences * seq_len * seq_len  # the model's boolean 4D attention mask
    return total


def _kernel_bytes(cfg: Config, shape: ModelShape, scored_tokens: int, backward: bool) -> float:
    """The log-prob step over `scored_tokens` tokens with the configured backend."""
    w, V = precision(cfg).weight, shape.vocab_size
    if cfg.logprob_backend == "naive":
        return scored_tokens * V * 4 * (FULL_LOGITS_COPIES if backward else 2)
    per_token = w * shape.hidden_size * (2 if backward else 1) + 16
    total = scored_tokens * per_token
    if cfg.logprob_backend == "chunked":
        from .kernels.chunked import CHUNK_BYTES

        total += 3 * min(CHUNK_BYTES, scored_tokens * V * 4)
    return total


def estimate(cfg: Config, shape: ModelShape, *, group_size: Optional[int] = None) -> MemoryPlan:
    """Peak GPU memory of the config's training step, by component (pure arithmetic).

    `group_size`: completions per group, needed for offline configs only."""
    p = precision(cfg)
    work = workload(cfg, group_size)
    S, T, n, n_c = work.sequences, work.seq_len, work.tokens, work.scored_tokens
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_layers
    s = p.stream
    quantized = _quantized(cfg)

    weights = weight_bytes(cfg, shape)
    sizes = _trainable_tensor_sizes(cfg, shape)
    if cfg.lora.enabled:
        trainable_bytes = p.lora
        lora_params = sum(sizes) * trainable_bytes
        gradients = lora_params
    else:
        trainable_bytes = p.weight
        lora_params = 0
        gradients = sum(sizes) * trainable_bytes
    optimizer = _optimizer_bytes(cfg, sizes, trainable_bytes)
    reference = weights if (not cfg.lora.enabled and _scores_without_grad(cfg)) else 0
    largest_linear = max(a * b for a, b in shape.linear_shapes().values())
    dequant = largest_linear * max(p.compute, s) if quantized else 0

    kv_per_token = 2 * L * shape.kv_dim * s
    if work.generates:
        kv_cache = S * T * kv_per_token
        prefill = (S * work.prompt_tokens * kv_per_token
                   + _forward_workspace(cfg, shape, S, work.prompt_tokens))
        # DynamicCache grows by torch.cat: one layer's k (or v) exists twice for a moment.
        decode = kv_cache + kv_cache / (2 * L) + S * shape.vocab_size * 4 * SAMPLING_COPIES
        generation_workspace = max(prefill, decode) - kv_cache
    else:
        kv_cache = generation_workspace = 0

    scoring = 0
    if _scores_without_grad(cfg):
        scoring = (_forward_workspace(cfg, shape, S, T) + n * s * h
                   + _kernel_bytes(cfg, shape, n_c, backward=False))

    per_layer = layer_activation_bytes_per_token(cfg, shape, T) * n
    final_norm = n * 4 * h
    activations_full = L * per_layer + final_norm
    activations_checkpointed = L * n * s * h + per_layer + final_norm
    grad_bytes = max(s, p.lora) if cfg.lora.enabled else s
    backward_workspace = n * (grad_bytes * i + s * h)

    return MemoryPlan(
        weights=int(weights),
        reference_weights=int(reference),
        lora_params=int(lora_params),
        optimizer_states=int(optimizer),
        dequant_buffer=int(dequant),
        cuda_overhead=CUDA_OVERHEAD,
        kv_cache=int(kv_cache),
        generation_workspace=int(generation_workspace),
        scoring=int(scoring),
        activations_checkpointed=int(activations_checkpointed),
        activations_full=int(activations_full),
        gradient_checkpointing=cfg.gradient_checkpointing,
        backward_workspace=int(backward_workspace),
        gradients=int(gradients),
        logprob_step=int(_kernel_bytes(cfg, shape, n_c, backward=True)),
        full_logits=int(n_c * shape.vocab_size * 4 * FULL_LOGITS_COPIES),
    )


# --------------------------------------------------------------------------------------------
# Card size and fit search
# --------------------------------------------------------------------------------------------

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'12GiB', '24GB', '8 GiB', '11.5 gib' -> bytes. GB = 10^9 bytes, GiB = 2^30 (a card sold
    as "12 GB" holds 12 GiB). Raises ConfigError naming --gpu-memory."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*", str(text))
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise ConfigError(f"--gpu-memory: cannot read {text!r}; give a size with a unit, e.g. 12GiB, "
                          "24GB or '8 GiB' (units B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, "
                          "TiB = powers of 1024)")
    value = float(match.group(1)) * unit
    if value <= 0:
        raise ConfigError(f"--gpu-memory: must be more than 0, got {text!r}")
    return int(value)


# Upper bounds of the fit search for num_generations and batch_size.
FIT_SEARCH_MAX = 1 << 16


def _largest_fitting(fits, low: int, high: int) -> int:
    """Largest x in [low, high] with fits(x), for monotone fits; low - 1 when none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def fit_search(cfg: Config, shape: ModelShape, budget: int, *,
               group_size: Optional[int] = None) -> dict[str, int]:
    """For each knob (dotted config key), the largest value whose plan total fits in `budget`
    bytes with every other key as configured; 0 when not even 1 fits. Online: num_generations,
    max_completion_length (up to the model's context), batch_size; offline: batch_size."""

    def fits_with(key: str):
        def fits(value: int) -> bool:
            if key == "batch_size":
                changed = dataclasses.replace(cfg, batch_size=value)
            else:
                changed = dataclasses.replace(
                    cfg, online=dataclasses.replace(cfg.online, **{key.split(".")[1]: value}))
            return estimate(changed, shape, group_size=group_size).total <= budget
        return fits

    results = {}
    if cfg.mode == "online":
        results["online.num_generations"] = _largest_fitting(
            fits_with("online.num_generations"), 1, FIT_SEARCH_MAX)
        context = shape.max_position_embeddings or FIT_SEARCH_MAX
        max_completion = max(1, context - cfg.online.max_prompt_length)
        results["online.max_completion_length"] = _largest_fitting(
            fits_with("online.max_completion_length"), 1, max_completion)
    results["batch_size"] = _largest_fitting(fits_with("batch_size"), 1, FIT_SEARCH_MAX)
    return results


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


_KERNEL_LABELS = {"auto": "fused Triton kernel", "triton": "fused Triton kernel",
                  "chunked": "chunked kernel", "naive": "naive: full logits"}


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def offline_group_size(cfg: Config) -> int:
    """The largest number of completions per group in cfg.dataset_path (offline plans)."""
    from .data import DataError, iter_json_entries

    if cfg.dataset_path is None:
        raise ConfigError("dataset_path: an offline plan reads the group size from it")
    try:
        sizes = []
        for line, record, problem in iter_json_entries(cfg.dataset_path):
            if problem is not None and not cfg.skip_invalid:
                raise DataError(f"{cfg.dataset_path}:{line}: {problem}")
            if isinstance(record, dict):
                sizes.append(len(record.get("completions") or []))
    except DataError as e:
        raise ConfigError(f"dataset_path: {e}") from None
    if not sizes or max(sizes) < 1:
        raise ConfigError(f"dataset_path: {cfg.dataset_path} holds no completions to size groups from")
    return max(sizes)


def _card(gpu_memory: Optional[str]) -> tuple[Optional[int], str]:
    if gpu_memory is not None:
        return parse_memory(gpu_memory), gpu_memory.strip()
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, props.name
    return None, ""


def _quant_label(cfg: Config) -> str:
    q = cfg.quantization
    if q.load_in_4bit:
        return f"{q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"
    if q.load_in_8bit:
        return "int8 (LLM.int8)"
    return planned_dtype(cfg)


def plan_command(cfg: Config, gpu_memory: Optional[str] = None) -> str:
    """The `grpo-fast plan` report: setup, breakdown table in GiB, total vs the card (from
    `gpu_memory`, else the local CUDA device, else none) and the fit search."""
    budget, card_name = _card(gpu_memory)
    shape = model_shape(cfg.model_path)
    group_size = offline_group_size(cfg) if cfg.mode == "offline" else None
    plan = estimate(cfg, shape, group_size=group_size)
    p = precision(cfg)
    work = workload(cfg, group_size)
    attn, attn_reason = planned_attention(cfg)
    dtype_name = {4: "fp32", 2: "bf16" if planned_dtype(cfg) != "float16" else "fp16"}

    lines = [f"VRAM plan for {cfg.model_path} ({cfg.mode} GRPO)"]
    setup = [
        ("model", f"{_count(shape.num_params)} params: {shape.num_layers} layers, "
                  f"hidden {shape.hidden_size}, "
                  f"MLP {shape.intermediate_size}, {shape.num_heads} heads / {shape.num_kv_heads} KV, "
                  f"vocab {shape.vocab_size}{', tied' if shape.tie_word_embeddings else ''}"),
        ("", f"shape from {shape.source}"),
        ("weights", f"{_quant_label(cfg)}; embeddings, LM head, norms {dtype_name[p.weight]}; "
                    f"activations {dtype_name[p.stream]}"),
    ]
    if cfg.lora.enabled:
        targets = lora_targets(cfg)
        setup.append(("LoRA", f"r={cfg.lora.r} on {','.join(t.replace('_proj', '') for t in targets)}: "
                              f"{_count(lora_param_count(cfg, shape))} params; optim {cfg.optim}"))
    else:
        setup.append(("training", f"full fine-tuning; optim {cfg.optim}"))
    if work.generates:
        prompts = f"{cfg.batch_size} prompt{'s' if cfg.batch_size != 1 else ''}"
        setup.append(("batch", f"{prompts} x G={cfg.online.num_generations} = {work.sequences} "
                               f"sequences of {work.prompt_tokens} + {work.completion_tokens} tokens"))
    else:
        setup.append(("batch", f"{cfg.batch_size} groups x {group_size} completions = {work.sequences} "
                               f"sequences of {work.seq_len} tokens"))
    setup.append(("attention", f"{attn} ({attn_reason}); gradient checkpointing "
                               f"{'on' if cfg.gradient_checkpointing else 'off'}"))
    lines += [f"  {k:<10} {v}" for k, v in setup]

    width = 52
    rows: list[tuple[str, Optional[float], str]] = [("resident", None, "")]
    rows.append(("  base weights", plan.weights, ""))
    if plan.reference_weights:
        rows.append(("  reference model copy (beta > 0)", plan.reference_weights, ""))
    if cfg.lora.enabled:
        rows.append(("  LoRA parameters", plan.lora_params, ""))
    rows.append((f"  optimizer states ({cfg.optim})", plan.optimizer_states, ""))
    if plan.dequant_buffer:
        rows.append(("  dequantization buffer", plan.dequant_buffer, ""))
    rows.append(("  CUDA context + allocator", plan.cuda_overhead, ""))
    if work.generates:
        rows += [("rollout (generate, no grad)", None, ""),
                 (f"  KV cache, {work.sequences} x {work.seq_len} tokens", plan.kv_cache, ""),
                 ("  prefill / sampling workspace", plan.generation_workspace, "")]
    if plan.scoring:
        rows += [("reference / old log-probs (no grad)", None, ""),
                 ("  forward workspace + log-probs", plan.scoring, "")]
    other_activations = plan.activations_full if cfg.gradient_checkpointing else plan.activations_checkpointed
    other_label = "without" if cfg.gradient_checkpointing else "with"
    rows += [("training step (forward + backward)", None, ""),
             (f"  activations{', checkpointed' if cfg.gradient_checkpointing else ''}", plan.activations,
              f"{other_label} checkpointing: {other_activations / GiB:.2f}"),
             ("  backward workspace", plan.backward_workspace, ""),
             ("  gradients", plan.gradients, ""),
             (f"  log-prob step ({_KERNEL_LABELS[cfg.logprob_backend]})", plan.logprob_step,
              f"full logits would need {plan.full_logits / GiB:.2f}")]
    lines += ["", f"  {'component':<{width}}{'GiB':>8}", "  " + "-" * (width + 8)]
    for label, value, note in rows:
        text = f"  {label:<{width}}{_gib(value) if value is not None else '':>8}"
        lines.append(f"{text}   ({note})" if note else text.rstrip())
    phases = {"rollout": plan.generation, "scoring": plan.scoring, "training": plan.training}
    peak_phase = max(phases, key=phases.get)
    lines += ["  " + "-" * (width + 8),
              f"  {'peak = resident + ' + peak_phase:<{width}}{_gib(plan.total)}",
              f"  {'(as torch.cuda.max_memory_allocated sees it)':<{width}}{_gib(plan.allocated)}",
              "  training = activations + gradients + the larger of the backward workspace and the",
              "  log-prob step (the latter is freed first in the backward)"]
    if budget is None:
        lines += ["", "  no card to compare with: pass --gpu-memory (e.g. --gpu-memory 12GiB)"]
        return "\n".join(lines)
    headroom = budget - plan.total
    verdict = f"fits, {headroom / GiB:.2f} GiB to spare" if headroom >= 0 else \
        f"does NOT fit: {-headroom / GiB:.2f} GiB over"
    lines += ["", f"  card {card_name} ({budget / GiB:.2f} GiB): {verdict}",
              f"  largest that fit, each with the others as configured:"]
    for key, value in fit_search(cfg, shape, budget, group_size=group_size).items():
        lines.append(f"    {key:<32}{value if value else 'none (not even 1)'}")
    return "\n".join(lines)
