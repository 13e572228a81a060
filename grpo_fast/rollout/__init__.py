"""Rollouts for online GRPO: the `Rollout` batch, and the interface every rollout backend implements.

    backend = make_backend(cfg, model, tokenizer, eos_ids)    # online.generation_backend
    roll = backend.generate(prompts)                          # (B*G, C): each prompt's G adjacent
    ... optimizer step ...
    backend.after_update(model)                               # a backend with its own weights syncs

A backend is one module in this package that subclasses `RolloutBackend` and registers itself
under a name with `@register_backend("name")`; `online.generation_backend` picks it. `hf`
(grpo_fast/rollout/hf.py) decodes with the live policy's own forward; `vllm`
(grpo_fast/rollout/vllm.py) samples from a vLLM engine kept in sync with it. Everything here is
backend-neutral: prompt tokenization (left-padded, cut from the left), the completion mask after
the first EOS, the EOS ids, and the completion metrics every backend's rollouts are logged with.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


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
    # The temperature the completions were sampled at (1.0 for greedy ones). The log-prob passes
    # read it from here, so sampling and scoring cannot disagree.
    temperature: float = 1.0
    # (N, C) fp32: the sampler's own log-prob of each completion token (0 past the mask), from a
    # backend whose numerics differ from the training forward (an inference engine); None when
    # the policy sampled itself. The loss corrects for the difference (grpo_fast.losses).
    sampler_logps: Optional[Tensor] = None

    def select(self, rows: Tensor) -> "Rollout":
        """The Rollout of the given (k,) row indices, in that order."""
        picked = rows.tolist()
        return Rollout(prompt_ids=self.prompt_ids[rows], prompt_mask=self.prompt_mask[rows],
                       completion_ids=self.completion_ids[rows], completion_mask=self.completion_mask[rows],
                       texts=[self.texts[i] for i in picked], terminated=self.terminated[rows],
                       lengths=self.lengths[rows], temperature=self.temperature,
                       sampler_logps=None if self.sampler_logps is None else self.sampler_logps[rows])

    def completion_token_lists(self) -> list[list[int]]:
        """Each row's completion ids up to and including its first EOS (what rewards see)."""
        return [ids[:n] for ids, n in zip(self.completion_ids.tolist(), self.lengths.tolist())]

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


def completion_metrics(lengths: Tensor, terminated: Tensor) -> dict[str, float]:
    """TRL's completion-length metrics; clipped_ratio = share cut at the length limit (no EOS)."""
    lengths = lengths.float()
    return {"completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": 1.0 - terminated.float().mean().item()}


# The sampling settings `online.generation_kwargs` may override, by these names.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_settings(online, backend: str) -> dict:
    """temperature, top_p, top_k, min_p and repetition_penalty from the online config, with
    `generation_kwargs` applied over them (TRL's escape hatch for sampling arguments; here only
    these names mean something, so another one is an error rather than silently ignored)."""
    extra = dict(online.generation_kwargs or {})
    unknown = sorted(set(extra) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"online.generation_kwargs: {', '.join(unknown)} not supported by the {backend} backend "
                         f"(it takes {', '.join(SAMPLING_KEYS)})")
    return {**{k: getattr(online, k) for k in SAMPLING_KEYS}, **extra}


class RolloutBackend(ABC):
    """Generates completions for the online trainer.

    Built once per run with the config, the policy, its tokenizer and the EOS ids; sampling
    settings come from `cfg.online` (num_generations, max_prompt_length, max_completion_length,
    temperature, top_p, top_k)."""

    def __init__(self, cfg, model, tokenizer, eos_ids: Sequence[int]):
        self.cfg, self.model, self.tokenizer, self.eos_ids = cfg, model, tokenizer, list(eos_ids)

    @abstractmethod
    def generate(self, prompts: Sequence[str], *, greedy: bool = False,
                 num_generations: Optional[int] = None) -> Rollout:
        """G sampled completions per prompt, a prompt's G adjacent (what
        grpo_fast.losses.group_advantages expects), with the config's sampling settings; G is
        `num_generations`, default cfg.online.num_generations. With `greedy`, one deterministic
        completion per prompt (evaluation)."""

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ValueError (one line, naming the key) for settings this backend cannot honour.
        Called before any model loads, so a bad setting is a config error, not a failure later."""

    def after_update(self, model) -> None:
        """Called after every optimizer update. A backend that samples from its own copy of the
        weights (an inference engine) syncs them before its next rollout; one that samples from
        `model` itself has nothing to do."""

    def metrics(self) -> dict[str, float]:
        """The backend's own metrics since the last call (e.g. an engine's weight-sync time),
        logged with the step's under TRL-style names."""
        return {}

    def close(self) -> None:
        """Release what the backend holds (an engine, its temporary files); called once the run ends."""


BACKENDS: dict[str, type[RolloutBackend]] = {}
# Built-in backends, imported on first use so that a backend's own dependencies (an inference
# engine) load only when it is chosen.
BUILTIN_BACKENDS = {"hf": "grpo_fast.rollout.hf", "vllm": "grpo_fast.rollout.vllm"}


def register_backend(name: str) -> Callable[[type[RolloutBackend]], type[RolloutBackend]]:
    """Class decorator: make a RolloutBackend subclass selectable as online.generation_backend."""

    def decorator(cls: type[RolloutBackend]) -> type[RolloutBackend]:
        if name in BACKENDS and BACKENDS[name] is not cls:
            raise ValueError(f"rollout backend {name!r} is already registered")
        BACKENDS[name] = cls
        return cls

    return decorator


def backend_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BUILTIN_BACKENDS, *BACKENDS]))


def backend_class(name: str) -> type[RolloutBackend]:
    """The backend registered as `name` (a built-in is imported on first use)."""
    if name not in BACKENDS and name in BUILTIN_BACKENDS:
        importlib.import_module(BUILTIN_BACKENDS[name])
    if name not in BACKENDS:
        raise ValueError(f"online.generation_backend: unknown backend {name!r}; expected one of "
                         f"{', '.join(backend_names())}")
    return BACKENDS[name]


def make_backend(cfg, model, tokenizer, eos_ids: Sequence[int]) -> RolloutBackend:
    """The backend cfg.online.generation_backend names, built for this policy."""
    return backend_class(cfg.online.generation_backend)(cfg, model, tokenizer, eos_ids)
