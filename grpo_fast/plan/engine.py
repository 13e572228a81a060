r"""The colocated vLLM engine's share of the card (`online.generation_backend: vllm`): what the
engine holds, the KV cache left to it, how many waves a rollout micro-batch takes in it, and
whether vLLM starts at all.

    from grpo_fast.plan.engine import engine_plan
    engine = engine_plan(cfg, shape, card=12 * GiB)   # EnginePlan; None for the hf backend
    engine.total, engine.kv_cache, engine.waves, engine.problem()

The engine is the one grpo_fast.rollout.vllm starts in the trainer's process, on the same GPU
(notation of grpo_fast.plan.formulas; w: bytes of the model dtype, which the engine computes
in; tp: vllm_tensor_parallel_size):
  * It claims vllm_gpu_memory_utilization x the card's total memory (ceil, per GPU), whatever
    else is on the card, and refuses to start unless that much is free when it starts, with
    the trainer's resident memory already there. Without the card's size there is no total.
  * Weights: the base in the model dtype (w bytes a parameter) whatever the trainer's
    quantization: a 4-bit base is dequantized and pushed in, so that vLLM samples exactly the
    trained policy. LoRA: one adapter slot (max_loras = 1) of rank lora.r rounded up to a rank
    vLLM allocates, on the same target modules, in the model dtype. Full fine-tuning: the full
    model, no slot. Both divided by vllm_tensor_parallel_size (vLLM shards the linears and the
    embeddings; the norms it replicates are negligible).
  * Profiled workspace: at start-up vLLM runs a dummy forward over max_num_batched_tokens
    tokens and a dummy sampler step over max_num_seqs rows, and keeps their peak out of the KV
    cache. The engine sets max_num_seqs to the rows of its largest generate call (the
    micro-batch, or the eval batch with eval_steps > 0; at most 1,024) and leaves
    max_num_batched_tokens to vLLM's default for the LLM class: 8,192, or 16,384 on a card of
    70 GiB or more (vLLM keeps 8,192 on an 80 GB A100, which the planner cannot tell from a
    size: an upper bound there). Forward, peaking in a layer's MLP: tokens x w x (2h + 3i/tp),
    the residual and the fused-norm hidden state, the merged gate/up output and the SiLU-and-mul
    product (the attention block's q/k/v and output are narrower). Sampler: rows x V x (w + 32):
    the LM head's logits; their fp32 copy, the processed log-probs the engine asks for, the
    probabilities and the sampling noise; and PyTorch top-k/top-p's sorted values, int64
    indices and cumulative probabilities (an upper bound where vLLM's Triton top-k/top-p runs).
  * ENGINE_FIXED = 0.25 GiB: memory outside torch's allocator (cuBLAS workspaces, NCCL with
    tensor parallelism), the CUDA graphs' pool (counted inside the fraction since vLLM 0.21)
    and the model runner's persistent buffers. A sleeping engine keeps it.
  * KV cache: what is left, in blocks of BLOCK_TOKENS tokens; per token 2 x L x kv_heads/tp x
    head_dim x w bytes (k and v of every layer in the model dtype; vLLM replicates a KV head
    when tp exceeds kv_heads). vLLM refuses to start unless it holds one sequence of
    max_model_len tokens (vllm_max_model_length; default max_prompt_length +
    max_completion_length).
  * A rollout micro-batch needs S x T tokens of it (S = batch_size x num_generations sequences,
    T = prompt + completion tokens): an upper bound, since vLLM's prefix cache shares a prompt's
    blocks among its G samples. When fewer sequences fit at once, vLLM schedules the rest as
    earlier ones finish: about ceil(S / at once) waves of up to max_completion_length decode
    steps each.

With online.vllm_mode server the engine runs on other GPUs (a `vllm-serve` process): the
trainer's GPU holds neither it nor a rollout phase.

How it adds up with the trainer (grpo_fast.plan.formulas, whose rollout phase the engine
replaces) is `MemoryPlan.total`: awake throughout, trainer resident + its largest phase + the
engine's total; with vllm_enable_sleep_mode, the larger of trainer resident + its largest phase
+ ENGINE_FIXED (the engine asleep: weights offloaded to CPU RAM, level 1, for a LoRA run, or
dropped and pushed anew on waking, level 2, for full fine-tuning; KV cache freed) and trainer
resident + the engine's total (rollouts, the trainer holding no activations). The latter assumes
the trainer's caching allocator hands its freed training blocks back (torch.cuda.empty_cache())
before the engine wakes: vLLM's sleep-mode allocator cannot reuse blocks torch keeps cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..config import Config
from ..rollout.vllm import VLLM_LORA_RANKS, engine_max_num_seqs
from .inputs import GiB, lora_param_count, precision, workload
from .shapes import ModelShape

# vLLM's KV cache block on CUDA, in tokens.
BLOCK_TOKENS = 16

# vLLM's max_num_batched_tokens for the LLM class, by card size (EngineArgs.get_batch_defaults).
LARGE_CARD = 70 * GiB
BATCHED_TOKENS, BATCHED_TOKENS_LARGE_CARD = 8192, 16384

# Outside torch's allocator, CUDA graphs, persistent buffers: kept while the engine sleeps.
ENGINE_FIXED = GiB // 4


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class EnginePlan:
    """The colocated vLLM engine, in bytes per GPU (module docstring). `card` None: no total."""

    card: Optional[int]
    utilization: float
    tensor_parallel: int
    sleep_mode: bool
    sleep_level: int        # 1: weights offloaded to CPU RAM (LoRA); 2: dropped (full fine-tuning)
    weights: int
    lora_slot: int
    lora_rank: int          # the slot's rank (0: full fine-tuning, no slot)
    batched_tokens: int     # max_num_batched_tokens of the profile forward
    max_num_seqs: int       # rows of the profile sampler step, and most sequences at once
    workspace: int          # the profile's peak
    fixed: int
    kv_per_token: int
    sequences: int          # S of one rollout micro-batch
    seq_len: int            # T
    max_model_len: int

    @property
    def total(self) -> Optional[int]:
        return None if self.card is None else math.ceil(self.utilization * self.card)

    @property
    def held(self) -> int:
        """Everything but the KV cache."""
        return self.weights + self.lora_slot + self.workspace + self.fixed

    @property
    def kv_cache(self) -> Optional[int]:
        """What the fraction leaves for the KV cache (negative: not even the rest fits)."""
        return None if self.total is None else self.total - self.held

    @property
    def kv_needed(self) -> int:
        """The KV cache one rollout micro-batch needs, all S sequences at full length."""
        return self.sequences * self.seq_len * self.kv_per_token

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // BLOCK_TOKENS)

    def _kv_total(self, blocks: int) -> int:
        """The engine total whose KV cache holds `blocks` blocks."""
        return self.held + blocks * BLOCK_TOKENS * self.kv_per_token

    @property
    def kv_blocks(self) -> int:
        return max(0, self.kv_cache or 0) // (BLOCK_TOKENS * self.kv_per_token)

    @property
    def starts(self) -> bool:
        """Whether vLLM starts: its KV cache holds one sequence of max_model_len tokens."""
        return self.total is not None and self.kv_blocks >= self._blocks(self.max_model_len)

    @property
    def at_once(self) -> int:
        """Sequences of the micro-batch the KV cache (and max_num_seqs) holds at once."""
        return min(self.sequences, self.max_num_seqs, self.kv_blocks // self._blocks(self.seq_len))

    @property
    def waves(self) -> int:
        """About how many rounds of decoding a micro-batch takes (0: the engine cannot start)."""
        return -(-self.sequences // self.at_once) if self.starts and self.at_once else 0

    @property
    def start_total(self) -> int:
        """The smallest engine total vLLM starts with."""
        return self._kv_total(self._blocks(self.max_model_len))

    @property
    def one_wave_total(self) -> int:
        """The smallest engine total that decodes a whole micro-batch at once."""
        return max(self.start_total, self._kv_total(self.sequences * self._blocks(self.seq_len)))

    @property
    def asleep(self) -> int:
        """What the engine keeps on the GPU while the trainer trains."""
        return self.fixed if self.sleep_mode else (self.total or 0)

    @property
    def offloaded(self) -> int:
        """CPU RAM the sleeping engine's weights take (level 1 only)."""
        return self.weights + self.lora_slot if self.sleep_mode and self.sleep_level == 1 else 0

    def utilization_for(self, total: int) -> float:
        """The smallest vllm_gpu_memory_utilization, in hundredths, whose total is >= `total`."""
        return math.ceil(100 * total / self.card) / 100 if self.card else math.inf

    def problem(self) -> Optional[str]:
        """One line saying why vLLM would not start on this card, or None."""
        if self.total is None or self.starts:
            return None
        least = self.utilization_for(self.start_total)
        fix = (f"raise it to at least {least:.2f}" if least <= 1 else
               f"even the whole card is too small for {_gib(self.start_total)}")
        what = (f"no room even for the engine's {_gib(self.weights + self.lora_slot)} of weights"
                if self.total < self.weights + self.lora_slot else
                f"{_gib(max(0, self.kv_cache))} of KV cache after its weights and workspace, less than one "
                f"{self.max_model_len}-token sequence")
        return (f"vLLM cannot start: online.vllm_gpu_memory_utilization {self.utilization:g} x "
                f"{_gib(self.card)} = {_gib(self.total)} leaves {what}; {fix}")


def serves_remotely(cfg: Config) -> bool:
    """online.vllm_mode server: the engine runs on other GPUs, neither it nor the rollout on
    the trainer's."""
    return (cfg.mode == "online" and cfg.online.generation_backend == "vllm"
            and getattr(cfg.online, "vllm_mode", "colocate") == "server")


def uses_engine(cfg: Config) -> bool:
    """A vLLM engine colocated on the trainer's GPU."""
    return cfg.mode == "online" and cfg.online.generation_backend == "vllm" and not serves_remotely(cfg)


def engine_plan(cfg: Config, shape: ModelShape, card: Optional[int]) -> Optional[EnginePlan]:
    """The colocated vLLM engine of an online config with generation_backend vllm (else None;
    None too with vllm_mode server, whose engine is on other GPUs), on a card of `card` bytes
    (None: sizes without a total)."""
    if not uses_engine(cfg):
        return None
    o, work = cfg.online, workload(cfg)
    tp = o.vllm_tensor_parallel_size
    w = precision(cfg).weight
    h, i, V = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    rank = next(r for r in VLLM_LORA_RANKS if r >= cfg.lora.r) if cfg.lora.enabled else 0
    rows = engine_max_num_seqs(cfg)
    batched = BATCHED_TOKENS_LARGE_CARD if card is not None and card >= LARGE_CARD else BATCHED_TOKENS
    forward = batched * w * (2 * h + 3 * i / tp)
    sampler = rows * V * (w + 32)
    kv_heads = max(1, shape.num_kv_heads // tp)
    return EnginePlan(
        card=card,
        utilization=o.vllm_gpu_memory_utilization,
        tensor_parallel=tp,
        sleep_mode=o.vllm_enable_sleep_mode,
        sleep_level=1 if cfg.lora.enabled else 2,
        weights=shape.num_params * w // tp,
        lora_slot=lora_param_count(cfg, shape, rank) * w // tp if rank else 0,
        lora_rank=rank,
        batched_tokens=batched,
        max_num_seqs=rows,
        workspace=int(max(forward, sampler)),
        fixed=ENGINE_FIXED,
        kv_per_token=2 * shape.num_layers * kv_heads * shape.head_dim * w,
        sequences=work.sequences,
        seq_len=work.seq_len,
        max_model_len=o.vllm_max_model_length or work.seq_len,
    )
