"""Rewards of the shipped toy tasks, for configs to name as ``grpo_fast.tasks:<function>``.

    rewards:
      - {name: "grpo_fast.tasks:char_match", kwargs: {width: 16}}

`configs/tiny-online.yaml` trains a random-weight tiny Llama with `char_match` on the
repeat-the-letter task of `data/make_tiny_online.py` ("c=" -> "ccc"). Same signature as every
reward function (see grpo_fast.rewards); tested in tests/test_online.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["char_match"]


def char_match(prompts: Sequence[Any], completions: Sequence[str], *, answer: Sequence[Any],
               width: int = 16, completion_ids: Sequence[Sequence[int]] | None = None,
               terminated: Sequence[bool] | None = None, **kwargs: Any) -> list[float]:
    """Dense string-matching reward in [0, 1], position by position.

    Position i scores 1 for the right character and ``0.5 * max(0, 1 - |ord(c_i) - ord(t_i)| / width)``
    for a wrong one; the sum is divided by ``max(len(completion), len(target))``, so a missing or
    an extra character scores 0 there: the full reward needs the target and nothing after it. The
    partial credit makes the task learnable from random weights (a uniformly random byte is
    almost never right, but often close); capping it at half keeps the right character always
    worth more than a safe guess near the middle of the alphabet.

    With `completion_ids` (the rollout always passes them) the completion's length is at least
    its token count, EOS excluded: special tokens such as pad or bos vanish from the decoded text
    but were generated, and without this the policy learns to fill the rest of its completion
    with invisible tokens instead of stopping."""
    if width <= 0:
        raise ValueError(f"char_match width must be > 0, got {width}")
    rewards = []
    for i, (completion, target) in enumerate(zip(completions, answer, strict=True)):
        target = str(target)
        length = len(completion)
        if completion_ids is not None:
            ended = terminated[i] if terminated is not None else False
            length = max(length, len(completion_ids[i]) - int(ended))
        n = max(length, len(target))
        if n == 0:
            rewards.append(1.0)
            continue
        score = sum(1.0 if c == t else 0.5 * max(0.0, 1.0 - abs(ord(c) - ord(t)) / width)
                    for c, t in zip(completion, target))
        rewards.append(score / n)
    return rewards
