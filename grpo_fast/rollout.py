"""Rollouts for online GRPO: G sampled completions per prompt from the current policy.

    roll = generate_completions(model, tokenizer, ["2+3=", "7*6="], num_generations=8,
                                max_prompt_length=256, max_completion_length=256, temperature=1.0)
    roll.completion_ids     # (B*G, C): each prompt's G completions adjacent
    roll.completion_mask    # (B*G, C): 1 up to and including the first EOS

Prompts are tokenized, cut from the left to `max_prompt_length` (the end of a prompt, next to
the completion, matters most) and left-padded, so every row's last prompt token sits in the same
column and generation appends to all rows at once. HF `generate` samples with its KV cache under
an explicit `GenerationConfig` (temperature, top_p, top_k, nothing else), so sampling settings in
a hub model's `generation_config.json` (repetition penalty, its own temperature) cannot change the
distribution the log-probs are later computed against. `greedy=True` decodes deterministically
for evaluation. Tested by tests/test_online.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor
from transformers import GenerationConfig


@dataclass
class Rollout:
    """A batch of N = B*G prompt + completion pairs, on the policy's device."""

    prompt_ids: Tensor        # (N, P) left-padded
    prompt_mask: Tensor       # (N, P) 1 on prompt tokens, 0 on left padding
    completion_ids: Tensor    # (N, C) C = longest completion in the batch
    completion_mask: Tensor   # (N, C) 1 up to and including the first EOS, 0 after
    texts: list[str]          # N completions decoded without special tokens
    terminated: Tensor        # (N,) bool: ended with EOS (False: cut at max_completion_length)
    lengths: Tensor           # (N,) long: completion tokens counted by the mask (EOS included)

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)         # (N, P+C)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)       # (N, P+C)

    @property
    def loss_mask(self) -> Tensor:
        """(N, P+C): 1 on the completion tokens whose log-probs enter the loss."""
        return torch.cat([torch.zeros_like(self.prompt_mask), self.completion_mask], dim=1)

    @property
    def position_ids(self) -> Tensor:
        """(N, P+C) the positions `generate` used: counted from each row's first real token, so
        left padding does not shift them (it would for absolute position embeddings)."""
        return (self.attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the model's generation EOS ids
    (chat models often stop on an end-of-turn token that is not the tokenizer's EOS)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation_config names none")
    return sorted(ids)


def tokenize_prompts(tokenizer, prompts: Sequence[str], max_prompt_length: int,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, P) left-padded prompt ids and mask; each prompt keeps its last max_prompt_length tokens."""
    encoded = [ids[-max_prompt_length:] for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    P = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = torch.full((len(encoded), P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((len(encoded), P), dtype=torch.long)
    for i, ids in enumerate(encoded):
        prompt_ids[i, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[i, P - len(ids):] = 1
    return prompt_ids.to(device), prompt_mask.to(device)


def completion_mask_after_eos(completion_ids: Tensor, eos_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(N, C) mask that keeps each row up to and including its first EOS, and (N,) terminated.

    Rows that never emit EOS (cut at the length limit) keep every token."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))  # (N, C)
    terminated = is_eos.any(dim=1)                                                                 # (N,)
    C = completion_ids.size(1)
    first_eos = torch.where(terminated, is_eos.int().argmax(dim=1), C)                             # (N,)
    columns = torch.arange(C, device=completion_ids.device)
    mask = (columns.unsqueeze(0) <= first_eos.unsqueeze(1)).long()                                 # (N, C)
    return mask, terminated


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: Sequence[str], *, num_generations: int = 1,
                         max_prompt_length: int, max_completion_length: int,
                         temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         greedy: bool = False, eos_ids: Optional[Sequence[int]] = None) -> Rollout:
    """Sample `num_generations` completions for each prompt (greedy: one deterministic decode per
    row; pass num_generations=1). Returns a Rollout with the G completions of a prompt adjacent,
    as `grpo_fast.losses.group_advantages` expects. The model is put in eval mode (dropout off)
    for the generation and restored afterwards."""
    device = next(model.parameters()).device
    eos_ids = list(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, max_prompt_length, device)  # (B, P)
    prompt_ids = prompt_ids.repeat_interleave(num_generations, dim=0)                         # (B*G, P)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, dim=0)                       # (B*G, P)

    # Every setting that shapes the distribution is explicit: unset ones would be filled in from
    # the model's generation_config.json. Greedy ignores them; it gets transformers' own defaults,
    # which it does not warn about.
    sampling = ({"temperature": 1.0, "top_p": 1.0, "top_k": 50} if greedy
                else {"temperature": temperature, "top_p": top_p, "top_k": top_k})
    generation_config = GenerationConfig(
        do_sample=not greedy, max_new_tokens=max_completion_length, min_new_tokens=0,
        num_beams=1, num_return_sequences=1, repetition_penalty=1.0, use_cache=True,
        eos_token_id=eos_ids, pad_token_id=pad, **sampling)
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                   generation_config=generation_config)                     # (B*G, P+C')
    finally:
        model.train(was_training)

    completion_ids = sequences[:, prompt_ids.size(1):]                                      # (B*G, C')
    completion_mask, terminated = completion_mask_after_eos(completion_ids, eos_ids)        # (B*G, C'), (B*G,)
    lengths = completion_mask.sum(dim=1)                                                    # (B*G,)
    # Pad to the longest completion of this batch, not to max_completion_length.
    C = int(lengths.max())
    completion_ids, completion_mask = completion_ids[:, :C], completion_mask[:, :C]
    completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
    # The mask is a prefix of each row: decode exactly the tokens the rewards are about.
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True)
             for ids, n in zip(completion_ids.tolist(), lengths.tolist())]
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, texts=texts, terminated=terminated, lengths=lengths)
