"""Rewards of the shipped toy tasks, for configs to name as ``grpo_fast.tasks:<function>``.

    rewards:
      - {name: "grpo_fast.tasks:char_match", kwargs: {width: 16}}

`configs/tiny-online.yaml` trains a random-weight tiny Llama with `char_match` on the copy task of
`data/make_tiny_online.py`. Same signature as every reward function (see grpo_fast.rewards).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["char_match"]


def char_match(prompts: Sequence[Any], completions: Sequence[str], *, answer: Sequence[Any],
               width: int = 16, **kwargs: Any) -> list[float]:
    """Dense string-matching reward in [0, 1]: per-position closeness of the characters.

    Position i scores ``max(0, 1 - |ord(c_i) - ord(t_i)| / width)`` (1 for the right character,
    partial credit for a near one), and the sum is divided by ``max(len(completion), len(target))``,
    so a missing or an extra character scores 0 there: the full reward needs the target exactly,
    then EOS. The partial credit is what makes the task learnable from random weights: a
    uniformly random byte is almost never exactly right, but often close."""
    if width <= 0:
        raise ValueError(f"char_match width must be > 0, got {width}")
    rewards = []
    for completion, target in zip(completions, answer, strict=True):
        target = str(target)
        n = max(len(completion), len(target))
        if n == 0:
            rewards.append(1.0)
            continue
        score = sum(max(0.0, 1.0 - abs(ord(c) - ord(t)) / width) for c, t in zip(completion, target))
        rewards.append(score / n)
    return rewards
