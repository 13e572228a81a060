"""Card sizes and the fit search: how much memory `--gpu-memory` names, and the largest value of
each batch knob whose planned peak fits in it.

    from grpo_fast.plan import fit_search, parse_memory
    fit_search(cfg, shape, parse_memory("12GiB"))   # {"batch_size": 6, ...}

Each knob is searched with the others as configured; the plan's total grows monotonically in
each of them, so a binary search finds the boundary.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from ..config import Config, ConfigError
from .formulas import estimate
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
