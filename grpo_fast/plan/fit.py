"""Card sizes and the fit search: how much memory `--gpu-memory` names, and the largest value of
each batch knob whose planned peak fits in it.

    from grpo_fast.plan import fit_search, parse_memory
    fit_search(cfg, shape, parse_memory("12GiB"))   # {"batch_size": 6, ...}

Each knob is searched with the others as configured; the plan's total grows monotonically in
each of them, so a binary search finds the boundary. With a vLLM engine a value fits when the
total does and vLLM starts (its KV cache holds one max_model_len sequence), which only gets
harder as a knob grows: the search stays a binary one. The engine's fraction of the card,
online.vllm_gpu_memory_utilization, is searched too, in hundredths: the total grows with it,
and vLLM starting only gets easier, so the largest fraction that fits is the answer unless
the engine cannot start even there. Under several processes (`parallel`) each value is
fitted per GPU: batch_size is each process's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from ..config import Config, ConfigError
from .engine import uses_engine
from .formulas import estimate
from .parallel import Parallelism
from .shapes import ModelShape

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


def _changed(cfg: Config, key: str, value) -> Config:
    if key == "batch_size":
        return dataclasses.replace(cfg, batch_size=value)
    return dataclasses.replace(cfg, online=dataclasses.replace(cfg.online, **{key.split(".")[1]: value}))


def fit_search(cfg: Config, shape: ModelShape, budget: int, *, group_size: Optional[int] = None,
               parallel: Optional[Parallelism] = None) -> dict[str, float]:
    """For each knob (dotted config key), the largest value whose plan fits in `budget` bytes
    (the card's memory) with every other key as configured; 0 when not even 1 fits. Online:
    num_generations, max_completion_length (up to the model's context, or to
    vllm_max_model_length when set), batch_size; offline: batch_size. With
    generation_backend vllm also vllm_gpu_memory_utilization, in hundredths (0: none).
    `parallel`: the launch, whose per-GPU plan must fit."""

    def fits_with(key: str):
        def fits(value: int) -> bool:
            return estimate(_changed(cfg, key, value), shape, group_size=group_size, card=budget,
                            parallel=parallel).fits(budget)
        return fits

    results: dict[str, float] = {}
    if cfg.mode == "online":
        o = cfg.online
        results["online.num_generations"] = _largest_fitting(
            fits_with("online.num_generations"), 1, FIT_SEARCH_MAX)
        context = shape.max_position_embeddings or FIT_SEARCH_MAX
        if uses_engine(cfg) and o.vllm_max_model_length:
            # The engine serves no longer sequence: config validation holds completions to it.
            context = min(context, o.vllm_max_model_length)
        max_completion = max(1, context - o.max_prompt_length)
        results["online.max_completion_length"] = _largest_fitting(
            fits_with("online.max_completion_length"), 1, max_completion)
    results["batch_size"] = _largest_fitting(fits_with("batch_size"), 1, FIT_SEARCH_MAX)
    if uses_engine(cfg):
        key = "online.vllm_gpu_memory_utilization"

        def total_fits(percent: int) -> bool:
            return estimate(_changed(cfg, key, percent / 100), shape, card=budget).total <= budget
        largest = _largest_fitting(total_fits, 1, 100)
        ok = largest and estimate(_changed(cfg, key, largest / 100), shape, card=budget).engine.starts
        results[key] = largest / 100 if ok else 0
    return results
