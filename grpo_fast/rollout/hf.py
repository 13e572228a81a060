"""The `hf` rollout backend: G sampled completions per prompt from the live policy, decoded by a
lean KV-cached loop over the model's own forward.

    backend = HFBackend(cfg, model, tokenizer, eos_ids)       # online.generation_backend: hf
    roll = backend.generate(["2+3=", "7*6="])                 # (B*G, C) completions, G adjacent

Prompts are tokenized, cut from the left to `max_prompt_length` (the end of a prompt, next to
the completion, matters most) and left-padded, so every row's last prompt token sits in the same
column and generation appends to all rows at once.

`sample_completions` is the decoding loop: the model's forward with its KV cache, then
temperature, top-k and top-p applied by hand (HF's order and semantics: a finished row gets pad,
decoding stops when every row has emitted EOS). It samples exactly what HF `generate` samples
under the same RNG state, without `generate`'s per-call setup (generation config merging,
logits-processor and stopping-criteria objects), which costs more than the model itself for
short completions of a small model. The sampling settings are explicit arguments, so a hub
model's `generation_config.json` (repetition penalty, its own temperature) cannot change the
distribution the log-probs are later computed against. `greedy=True` decodes deterministically
for evaluation. The backend samples from the very model being trained, so it has nothing to
sync after an update. Tested by tests/test_online.py (against `generate`, greedy and sampled).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from .. import distributed
from . import (Rollout, RolloutBackend, completion_mask_after_eos, eos_token_ids, register_backend, sampling_settings,
               tokenize_prompts)


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, min_p: Optional[float] = None) -> Tensor:
    """(N, V) next-token logits divided by `temperature`, then all but the `top_k` largest (0: no
    limit), all outside the smallest set holding `top_p` of the probability, and (`min_p`) all
    whose probability is below min_p times the top token's set to -inf: HF's Temperature, TopK,
    TopP and MinP warpers in their order, ties and the one token top-p and min-p always keep
    included."""
    if temperature != 1.0:
        logits = logits / temperature
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                                  # (N, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        ascending, order = logits.sort(dim=-1)                                          # (N, V) x2
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), -math.inf)
    if min_p is not None and min_p > 0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)
    return logits


def penalize_repetitions(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """HF's (and vLLM's) repetition penalty: the (N, V) logits of tokens already in a row
    (`seen`, (N, V) bool: its prompt and what it has generated) are divided by `penalty` where
    positive and multiplied by it where negative, so they become less likely either way."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _next_token_logits(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                       cache) -> tuple[Tensor, object]:
    """(N, V) fp32 logits of the token after `input_ids`, and the KV cache extended by it."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), out.cache


@torch.no_grad()
def sample_completions(model, prompt_ids: Tensor, prompt_mask: Tensor, *, num_generations: int = 1,
                       max_completion_length: int, eos_ids: Sequence[int], pad_id: int,
                       greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                       top_k: int = 0, min_p: Optional[float] = None,
                       repetition_penalty: float = 1.0,
                       all_finished: Optional[Callable[[bool], bool]] = None) -> Tensor:
    """(B*G, C) completion ids for left-padded (B, P) prompts, G = `num_generations` adjacent
    rows per prompt, C <= max_completion_length the longest completion.

    The prompts go through the model once, not G times: their KV cache and next-token logits
    are then repeated G times (the prompt is most of the work when completions are short). Then
    one forward per new token. A row that has emitted EOS reads `pad_id` from then on; decoding
    stops once every row has. Positions count from each row's first real token, as in `generate`.

    Finished rows leave the batch: once a quarter of the rows still being decoded have emitted
    EOS, the KV cache, mask and positions keep only the others (one gather of the cache, so it
    is not done for every row that finishes). Completion lengths vary widely in GRPO, and
    `generate` runs every row until the longest ends. Sampling still draws over all B*G rows,
    finished ones as a certain pad, so the random stream, and with it every sample, is what
    `generate` draws from the same seed (tests/test_online.py).

    `all_finished(done_here)` (a model sharded by FSDP2 or ZeRO-3: every forward is a collective)
    says whether every rank is done: a rank that finishes first keeps step with the others, one
    one-token forward per token they decode, as `generate(synced_gpus=True)` does."""
    eos = torch.tensor(list(eos_ids), device=prompt_ids.device)
    position_ids = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)                           # (B, P)
    logits, cache = _next_token_logits(model, prompt_ids, prompt_mask, position_ids, None)  # (B, V)
    if num_generations > 1:
        cache.batch_repeat_interleave(num_generations)
        logits = logits.repeat_interleave(num_generations, dim=0)                         # (N, V)
    N, V = logits.shape
    attention_mask = prompt_mask.repeat_interleave(num_generations, dim=0)                # (A, P)
    position_ids = position_ids[:, -1:].repeat_interleave(num_generations, dim=0)         # (A, 1)
    rows = torch.arange(N, device=logits.device)                # (A,) output row of each batch row
    alive = torch.ones(N, dtype=torch.bool, device=logits.device)                         # (A,)
    tokens = torch.full((N, max_completion_length), pad_id, dtype=torch.long, device=logits.device)
    seen = None
    if repetition_penalty != 1.0:
        # Every token of a row's input so far, left padding included (what generate's processor sees).
        seen = torch.zeros((N, V), dtype=torch.bool, device=logits.device)
        seen.scatter_(1, prompt_ids.repeat_interleave(num_generations, dim=0), True)           # (N, V)
    for step in range(max_completion_length):
        if seen is not None:
            logits = penalize_repetitions(logits, seen[rows], repetition_penalty)           # (A, V)
        if greedy:
            next_ids = logits.argmax(dim=-1)                                              # (A,)
        else:
            if rows.numel() < N:
                # Rows gone from the batch are a certain pad: same draws as generate's full batch.
                full = logits.new_full((N, V), -math.inf)
                full[:, pad_id] = 0.0
                logits = full.index_copy_(0, rows, logits)                                # (N, V)
            probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p).softmax(dim=-1)
            next_ids = torch.multinomial(probs, num_samples=1).squeeze(1)[rows]          # (A,)
        next_ids = torch.where(alive, next_ids, pad_id)
        tokens[rows, step] = next_ids
        if seen is not None:
            seen[rows, next_ids] = True
        alive &= ~torch.isin(next_ids, eos)
        # One host sync per token, as generate's stopping check: on CPU it is free, and on a GPU
        # the forwards it saves outweigh it.
        done = rows.numel() - int(alive.sum())
        finished = step == max_completion_length - 1 or done == rows.numel()
        if all_finished is not None:
            while finished and not all_finished(True):
                model(input_ids=prompt_ids[:1, -1:], use_cache=False, logits_to_keep=1)  # output unused
            if not finished:
                all_finished(False)
        if finished:
            break
        if 4 * done >= rows.numel():
            keep = alive.nonzero().squeeze(1)                                             # (A',)
            cache.batch_select_indices(keep)
            rows, alive, next_ids = rows[keep], alive[keep], next_ids[keep]
            attention_mask, position_ids = attention_mask[keep], position_ids[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.size(0), 1)], dim=1)
        position_ids = position_ids + 1
        logits, cache = _next_token_logits(model, next_ids[:, None], attention_mask, position_ids, cache)
    return tokens[:, :step + 1]                                                           # (N, C)


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: Sequence[str], *, num_generations: int = 1,
                         max_prompt_length: int, max_completion_length: int,
                         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         min_p: Optional[float] = None, repetition_penalty: float = 1.0,
                         greedy: bool = False, eos_ids: Optional[Sequence[int]] = None,
                         gather: bool = True) -> Rollout:
    """Sample `num_generations` completions for each prompt (greedy: one deterministic decode per
    row; pass num_generations=1). Returns a Rollout with the G completions of a prompt adjacent,
    as `grpo_fast.losses.group_advantages` expects. The model is put in eval mode (dropout off)
    for the generation and restored afterwards.

    A model sharded by FSDP2 or ZeRO-3 is gathered whole for the decoding with `gather` (TRL's
    ds3_gather_for_generation): one all-gather per unit instead of one per unit and decoded
    token, for the memory of the whole weights meanwhile. Without it, the ranks decode sharded,
    in step (`sample_completions`' all_finished)."""
    device = next(model.parameters()).device
    eos_ids = list(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, max_prompt_length, device)  # (B, P)
    was_training = model.training
    model.eval()
    try:
        with distributed.gathered(model) if gather else contextlib.nullcontext():
            completion_ids = sample_completions(
                model, prompt_ids, prompt_mask, num_generations=num_generations,
                max_completion_length=max_completion_length, eos_ids=eos_ids, pad_id=pad, greedy=greedy,
                temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                all_finished=None if gather else _all_finished(model))                     # (B*G, C)
    finally:
        model.train(was_training)
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)                         # (B*G, P)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)                       # (B*G, P)

    # Already padded after EOS and as wide as the longest completion (sample_completions stops there).
    completion_mask, terminated = completion_mask_after_eos(completion_ids, eos_ids)        # (B*G, C), (B*G,)
    lengths = completion_mask.sum(dim=1)                                                    # (B*G,)
    # The mask is a prefix of each row: decode exactly the tokens the rewards are about.
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True)
             for ids, n in zip(completion_ids.tolist(), lengths.tolist())]
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, texts=texts, terminated=terminated, lengths=lengths,
                   temperature=1.0 if greedy else temperature)


def _all_finished(model) -> Optional[Callable[[bool], bool]]:
    """For a model sharded by FSDP2 or ZeRO-3: whether a flag holds on every rank (sample_completions)."""
    if not (isinstance(model, FSDPModule) or distributed.is_zero3(model)):
        return None
    world = distributed.setup()
    return lambda flag: distributed.all_true(world, flag)


@register_backend("hf")
class HFBackend(RolloutBackend):
    """Samples from the policy being trained, with the config's sampling settings. A repetition
    penalty or min_p changes what is sampled but not what the log-prob pass scores (the
    temperature-scaled model distribution), as in TRL."""

    def __init__(self, cfg, model, tokenizer, eos_ids):
        super().__init__(cfg, model, tokenizer, eos_ids)
        self.sampling = sampling_settings(cfg.online, "hf")

    @classmethod
    def check_config(cls, cfg) -> None:
        sampling_settings(cfg.online, "hf")

    def generate(self, prompts: Sequence[str], *, greedy: bool = False,
                 num_generations: Optional[int] = None) -> Rollout:
        o = self.cfg.online
        G = 1 if greedy else num_generations or o.num_generations
        return generate_completions(
            self.model, self.tokenizer, prompts, num_generations=G,
            max_prompt_length=o.max_prompt_length, max_completion_length=o.max_completion_length,
            greedy=greedy, eos_ids=self.eos_ids, gather=o.ds3_gather_for_generation, **self.sampling)
