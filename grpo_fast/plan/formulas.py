r"""The memory formulas: peak GPU memory of one training step, by component, from a config and
a model shape (pure arithmetic: nothing is downloaded or allocated).

    from grpo_fast.plan import estimate, model_shape
    plan = estimate(cfg, model_shape(cfg.model_path))   # MemoryPlan, byte counts
    plan.total, plan.allocated

The arithmetic assumes a Llama-style decoder (Llama, Qwen2, Mistral): RMSNorm, GQA attention
with RoPE, SwiGLU MLP (gate/up/down), optional untied LM head.

Notation (per micro-batch): S sequences (online: batch_size prompts x num_generations; offline:
batch_size groups x K completions), T = prompt + completion tokens each, n = S x T tokens,
n_c = S x completion tokens (the tokens whose log-probs are scored; offline: all n), L layers,
h hidden, i intermediate, q = heads x head_dim, kv = kv_heads x head_dim, a heads, V vocab,
r LoRA rank. Bytes: s activations ("stream"), w unquantized weights, l LoRA adapters (4); which
dtype each takes is in grpo_fast.plan.inputs.

Online log-prob forwards run each distinct prompt once by default (`online.shared_prompt`):
the prompt's layers then work on batch_size x P tokens instead of S x P, while attention still
saves S x T keys and values. The planner counts the unshared forward (n tokens everywhere), an
upper bound: sharing lowers the training and scoring phases, never raises them.

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
  * CUDA context + caching-allocator slack: CUDA_OVERHEAD = 0.5 GiB (the context takes
    ~0.3-0.4 GiB with lazy module loading, plus fragmentation). Not seen by
    `torch.cuda.max_memory_allocated`; `MemoryPlan.allocated` leaves it out for that comparison.

Phases; the peak is resident + the largest phase (the caching allocator reuses a phase's blocks
in the next), plus the engine with generation_backend vllm (grpo_fast.plan.engine):
  * Rollout (no grad, online only, generation_backend hf; a vLLM engine generates instead): KV cache 2 x L x kv x s bytes per token (k and v of every
    layer, in the stream dtype) for S x T tokens; plus the larger of the prefill (cache for S x P
    prompt tokens + one layer's working set) and the last decode step (full cache + a copy of
    one layer's k or v from DynamicCache's torch.cat + sampling: S x V x 4 bytes x 4 for the fp32
    logits and the temperature / top-p copies; generate computes logits for the last position
    only). The no-grad forward's working set peaks in the last layer's up_proj adapter:
    n x (4 s h + 2 s head_dim + 2 s i + 2 l i + l h) + S x T^2: the embedding output (the model
    keeps it), the layer's input, the residual and the normed MLP input; RoPE's cos and sin; the
    SiLU output and the base output's clone (peft's bitsandbytes layer clones it); the LoRA-B
    output and its scaled copy; peft's cast of the input to l (none when s = l); the model's
    boolean attention mask (none for FlashAttention-2).
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

One process's plan; per GPU under DDP, FSDP2 or DeepSpeed ZeRO (`estimate(..., parallel=...)`)
it is reshaped as grpo_fast.plan.parallel's docstring derives.

Not modelled (small): RoPE cos/sin tables, per-module quantization codebooks (~1 KB), the
optimizer step's temporaries (it runs after the activations are freed), rollout token ids and
stored log-probs (S x T x 4 bytes each).

Tests: tests/test_plan.py: the arithmetic on known shapes; the per-layer formula against the
tensors autograd actually saves; the rollout and training phases against the CPU profiler's
peak of a small QLoRA model (generation within 3%; training an upper bound within 25%); the
vLLM engine's arithmetic and how each of its config keys moves the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import Config, ConfigError
from .engine import EnginePlan, engine_plan, serves_remotely
from .parallel import Parallelism, per_gpu
from .shapes import ATTN_IN, MLP_IN, ModelShape
from .inputs import (GiB, lora_targets, planned_attention, precision, quantized, scores_without_grad,
                     workload)
from .params import optimizer_bytes, trainable_tensor_sizes, weight_bytes

# CUDA context (~0.3-0.4 GiB with lazy module loading) + caching-allocator fragmentation.
CUDA_OVERHEAD = GiB // 2

# The sampler's copies of the last-position logits: fp32 logits, temperature-scaled logits,
# top-p's sorted values and int64 indices.
SAMPLING_COPIES = 4

# Full logits need the logits, their log_softmax and its gradient, all fp32.
FULL_LOGITS_COPIES = 3


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
    # the colocated vLLM engine (generation_backend vllm; kv_cache and generation_workspace are
    # then 0: the trainer does not generate)
    engine: Optional[EnginePlan] = None
    # per GPU under several processes (grpo_fast.plan.parallel; None: one process): DDP's
    # gradient buckets, ZeRO's fp32 master partition, the gathered (unsharded) working copy of
    # FSDP2 / ZeRO-3 (resident), and the training phase's reduce transient (FSDP2: one layer's
    # full gradient; ZeRO: the reduce bucket)
    parallel: Optional[Parallelism] = None
    ddp_buckets: int = 0
    master_weights: int = 0
    gathered_weights: int = 0
    reduce_buffer: int = 0
    # FSDP2 hf rollouts with online.ds3_gather_for_generation: the rest of the policy, gathered
    # whole for the decoding (a rollout-phase buffer beside gathered_weights).
    rollout_gathered: int = 0

    @property
    def activations(self) -> int:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations_full

    @property
    def resident(self) -> int:
        return (self.weights + self.reference_weights + self.lora_params + self.optimizer_states
                + self.dequant_buffer + self.cuda_overhead + self.ddp_buckets + self.master_weights
                + self.gathered_weights)

    @property
    def generation(self) -> int:
        return self.kv_cache + self.generation_workspace + self.rollout_gathered

    @property
    def training(self) -> int:
        # The log-prob step's memory peaks at the end of the forward and is freed first in the
        # backward, before the layers' backward working set exists.
        return (self.activations + self.gradients + self.reduce_buffer
                + max(self.logprob_step, self.backward_workspace))

    @property
    def trainer(self) -> int:
        """The trainer's own peak: resident + its largest phase."""
        return self.resident + max(self.generation, self.scoring, self.training)

    @property
    def total(self) -> int:
        """The peak on the card; with a vLLM engine, how the two add up (grpo_fast.plan.engine)."""
        engine = self.engine
        if engine is None:
            return self.trainer
        if engine.total is None:
            raise ConfigError("--gpu-memory: needed for a vLLM plan: the engine takes "
                              "online.vllm_gpu_memory_utilization of the card's memory")
        if engine.sleep_mode:
            return max(self.trainer + engine.asleep, self.resident + engine.total)
        return self.trainer + engine.total

    @property
    def allocated(self) -> int:
        """The total as `torch.cuda.max_memory_allocated` sees it (no context, no slack)."""
        return self.total - self.cuda_overhead

    def fits(self, budget: int) -> bool:
        """Whether the peak fits in `budget` bytes, and a vLLM engine starts in it."""
        return self.total <= budget and (self.engine is None or self.engine.starts)


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
        # No adapter's copies to count: bound it by the SiLU output, the up output, their product
        # and one more i-wide copy.
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
        from ..kernels.chunked import CHUNK_BYTES

        total += 3 * min(CHUNK_BYTES, scored_tokens * V * 4)
    return total


def estimate(cfg: Config, shape: ModelShape, *, group_size: Optional[int] = None,
             card: Optional[int] = None, parallel: Optional[Parallelism] = None) -> MemoryPlan:
    """Peak GPU memory of the config's training step, by component (pure arithmetic).

    `group_size`: completions per group, needed for offline configs only. `card`: the GPU's
    memory in bytes, which a vLLM engine takes its fraction of (without it, no total).
    `parallel`: the launch (grpo_fast.plan.parallel), for each GPU's share of it; None: one
    process."""
    p = precision(cfg)
    work = workload(cfg, group_size)
    S, T, n, n_c = work.sequences, work.seq_len, work.tokens, work.scored_tokens
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_layers
    s = p.stream

    weights = weight_bytes(cfg, shape)
    sizes = trainable_tensor_sizes(cfg, shape)
    if cfg.lora.enabled:
        trainable_bytes = p.lora
        lora_params = sum(sizes) * trainable_bytes
        gradients = lora_params
    else:
        trainable_bytes = p.weight
        lora_params = 0
        gradients = sum(sizes) * trainable_bytes
    optimizer = optimizer_bytes(cfg, sizes, trainable_bytes)
    reference = weights if (not cfg.lora.enabled and scores_without_grad(cfg)) else 0
    largest_linear = max(a * b for a, b in shape.linear_shapes().values())
    dequant = largest_linear * max(p.compute, s) if quantized(cfg) else 0

    engine = engine_plan(cfg, shape, card)
    kv_per_token = 2 * L * shape.kv_dim * s
    if work.generates and engine is None and not serves_remotely(cfg):
        kv_cache = S * T * kv_per_token
        prefill = (S * work.prompt_tokens * kv_per_token
                   + _forward_workspace(cfg, shape, S, work.prompt_tokens))
        # DynamicCache grows by torch.cat: one layer's k (or v) exists twice for a moment.
        decode = kv_cache + kv_cache / (2 * L) + S * shape.vocab_size * 4 * SAMPLING_COPIES
        generation_workspace = max(prefill, decode) - kv_cache
    else:
        kv_cache = generation_workspace = 0

    scoring = 0
    if scores_without_grad(cfg):
        scoring = (_forward_workspace(cfg, shape, S, T) + n * s * h
                   + _kernel_bytes(cfg, shape, n_c, backward=False))

    per_layer = layer_activation_bytes_per_token(cfg, shape, T) * n
    final_norm = n * 4 * h
    activations_full = L * per_layer + final_norm
    activations_checkpointed = L * n * s * h + per_layer + final_norm
    grad_bytes = max(s, p.lora) if cfg.lora.enabled else s
    backward_workspace = n * (grad_bytes * i + s * h)

    plan = MemoryPlan(
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
        engine=engine,
    )
    return plan if parallel is None else per_gpu(cfg, shape, plan, parallel)
