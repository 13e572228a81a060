r"""Reward functions for online GRPO: built-ins, loading from config, and batched scoring.

A reward function has the signature TRL users already write::

    def my_reward(prompts, completions, **columns) -> list[float | None]

``prompts`` and ``completions`` are lists of strings (completions decoded with special tokens
stripped); ``columns`` holds every extra dataset column (e.g. ``answer``) plus
``completion_ids`` (list[list[int]]) and ``terminated`` (list[bool]: True when the completion
ended with EOS rather than at the length limit), each a list aligned with ``completions``.
Return one finite float per completion, or None where the reward does not apply to that sample
(a NaN or inf is an error, never read as None).
Functions should take ``**kwargs`` so new columns do not break them.

Config lists rewards as specs::

    rewards:
      - {name: math_answer}
      - {name: format, weight: 0.2, kwargs: {pattern: "<answer>.*?</answer>"}}
      - {name: my_pkg.rewards:brevity, weight: 0.5}

``load_reward_functions(specs)`` resolves them (built-in name or ``"package.module:function"``),
``compute_rewards`` runs them on a batch and combines them, ``reward_metrics`` summarizes the
result under TRL's metric names.

Built-ins (``BUILTIN_REWARDS``): ``math_answer``, ``format``, ``length``, ``exact_match``.
"""

from __future__ import annotations

import functools
import importlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFunction",
    "compute_rewards",
    "exact_match_reward",
    "extract_answer",
    "format_reward",
    "length_reward",
    "load_reward_functions",
    "math_answer_reward",
    "reward_metrics",
]

RewardFn = Callable[..., Sequence[Any]]

# --------------------------------------------------------------------------------------------
# Answer extraction for math_answer
# --------------------------------------------------------------------------------------------

# A number: optional sign (only when not glued to a preceding word/number, so "5-6" reads as 6),
# digits with optional "1,234"-style thousands groups, optional decimals; or ".5".
_NUMBER = r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w.])-)?\.\d+"
_NUMBER_RE = re.compile(rf"(?P<num>{_NUMBER})(?:\s*/\s*(?P<den>{_NUMBER}))?")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_FRAC_DIGITS_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")  # \frac12
_HASH_ANSWER_RE = re.compile(r"####([^\n]*)")
# LaTeX spellings of characters that would hide a number from _NUMBER_RE.
_LATEX_REPLACEMENTS = (("{,}", ","), ("\\!", ""), ("\\,", ""), ("\\$", "$"), ("\u2212", "-"))


def _last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (balanced braces), or None if absent or unclosed."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : i]
    return None


def _to_float(token: str) -> float:
    return float(token.replace(",", ""))


def _parse_number(text: str, *, last: bool = True) -> float | None:
    """The last (or first) number or ``a/b`` fraction in ``text``, after LaTeX normalization."""
    for latex, plain in _LATEX_REPLACEMENTS:
        text = text.replace(latex, plain)
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = _LATEX_FRAC_DIGITS_RE.sub(r"\1/\2", text)
    matches = list(_NUMBER_RE.finditer(text))
    if not matches:
        return None
    match = matches[-1] if last else matches[0]
    value = _to_float(match["num"])
    if match["den"] is not None:
        denominator = _to_float(match["den"])
        if denominator == 0:
            return None
        value /= denominator
    return value


def extract_answer(text: str) -> float | None:
    r"""The numeric final answer of a solution, or None.

    Precedence: the last ``\boxed{...}`` (a boxed answer with no number in it is None: the model
    committed to a non-numeric answer); else the first number after the last ``####`` (GSM8K);
    else the last number in the text. Understands ``\frac{a}{b}``/``\dfrac``/``\tfrac``, ``a/b``,
    ``-3``, ``2.5``, ``.5``, ``1,234``, ``$`` and a trailing ``.``.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return _parse_number(boxed)
    hashes = _HASH_ANSWER_RE.findall(text)
    if hashes:
        value = _parse_number(hashes[-1], last=False)
        if value is not None:
            return value
    return _parse_number(text)


def _reference_value(answer: Any) -> float | None:
    if isinstance(answer, numbers.Real):
        return float(answer)
    return extract_answer(str(answer))


# --------------------------------------------------------------------------------------------
# Built-in reward functions
# --------------------------------------------------------------------------------------------


def math_answer_reward(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    answer: Sequence[Any],
    tolerance: float = 1e-6,
    **kwargs: Any,
) -> list[float | None]:
    r"""1.0 when the completion's final numeric answer equals the reference answer, else 0.0.

    The completion's answer is read by ``extract_answer`` (last ``\boxed{}``, else ``#### x``,
    else the last number). ``answer`` (a dataset column) may be a number, a bare number string or
    a full GSM8K solution ending in ``#### 72``. Equal means
    ``math.isclose(pred, ref, rel_tol=tolerance, abs_tol=tolerance)``. No number in the
    completion scores 0.0; a reference with no number gives None (not applicable to that sample).
    """
    rewards: list[float | None] = []
    for completion, ref in zip(completions, answer, strict=True):
        reference = _reference_value(ref)
        if reference is None:
            rewards.append(None)
            continue
        predicted = extract_answer(completion)
        correct = predicted is not None and math.isclose(
            predicted, reference, rel_tol=tolerance, abs_tol=tolerance
        )
        rewards.append(1.0 if correct else 0.0)
    return rewards


DEFAULT_FORMAT_PATTERN = r"<think>.*?</think>\s*<answer>.*?</answer>"


@functools.lru_cache(maxsize=32)
def _compile_format(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.DOTALL)


def format_reward(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    pattern: str = DEFAULT_FORMAT_PATTERN,
    **kwargs: Any,
) -> list[float]:
    r"""1.0 when the whole completion (whitespace-stripped) matches ``pattern``, else 0.0.

    The match is ``re.fullmatch`` with ``re.DOTALL`` (``.`` crosses newlines). The default,
    ``<think>.*?</think>\s*<answer>.*?</answer>``, asks for reasoning then an answer and nothing
    else. Set ``kwargs: {pattern: ...}`` in the reward spec for another layout, e.g. when the
    chat template already opens ``<think>`` in the prompt.
    """
    compiled = _compile_format(pattern)
    return [1.0 if compiled.fullmatch(c.strip()) else 0.0 for c in completions]


def length_reward(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    target: int = 256,
    completion_ids: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Penalty for running past ``target``: 0 up to it, then -(excess / target), floored at -1.

    Length is in tokens (``len(completion_ids[i])``) when the ``completion_ids`` column is given,
    which the rollout always does, and in characters otherwise; ``target`` is in the same unit.
    Reaches -1 at twice the target.
    """
    if target <= 0:
        raise ValueError(f"length reward target must be > 0, got {target}")
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else map(len, completions)
    return [max(-1.0, min(0.0, (target - n) / target)) for n in lengths]


def exact_match_reward(
    prompts: Sequence[Any],
    completions: Sequence[str],
    *,
    answer: Sequence[Any],
    terminated: Sequence[bool] | None = None,
    **kwargs: Any,
) -> list[float]:
    """1.0 when ``completion.strip() == str(answer).strip()`` and the completion terminated.

    Whitespace at either end is ignored, nothing else. When the ``terminated`` column is given,
    a completion cut off at the length limit scores 0.0 even if its text matches, so the policy
    learns to stop (emit EOS) rather than to pad to the limit.
    """
    if terminated is None:
        terminated = [True] * len(completions)
    return [
        1.0 if done and completion.strip() == str(ref).strip() else 0.0
        for completion, ref, done in zip(completions, answer, terminated, strict=True)
    ]


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math_answer": math_answer_reward,
    "format": format_reward,
    "length": length_reward,
    "exact_match": exact_match_reward,
}


# --------------------------------------------------------------------------------------------
# Loading from config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardFunction:
    """A resolved reward: ``fn`` already has the spec's ``kwargs`` bound (functools.partial).

    ``name`` is the built-in name, or the function's name for ``"module:function"`` specs
    (as TRL names custom rewards); it keys the ``rewards/<name>/...`` metrics.
    """

    name: str
    fn: RewardFn
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


_SPEC_KEYS = frozenset({"name", "weight", "kwargs"})


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line (a SyntaxError's or a user exception's may span several)."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _import_function(path: str) -> RewardFn:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError("expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code, not only ImportError
        raise ValueError(f"cannot import module {module_name!r}: {_one_line(err)}") from err
    try:
        fn = getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from err
    if not callable(fn):
        raise ValueError(f"{attr!r} is a {type(fn).__name__}, not a callable")
    return fn


def _load_one(spec: Any) -> RewardFunction:
    """One spec resolved; a ValueError here says what is wrong, the caller says which spec."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError(
            f"reward spec must be a mapping with a 'name' (a non-empty string), got {spec!r:.80}"
        )
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown spec keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    name = spec["name"]
    if ":" in name:
        target = _import_function(name)
        name = name.partition(":")[2]
    elif name in BUILTIN_REWARDS:
        target = BUILTIN_REWARDS[name]
    else:
        raise ValueError(
            f"unknown reward; built-ins are {sorted(BUILTIN_REWARDS)}, "
            "or give an import path 'package.module:function'"
        )
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"'kwargs' must be a mapping, got {type(kwargs).__name__}")
    weight = spec.get("weight", 1.0)
    # A non-finite weight would make every total inf or NaN.
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"'weight' must be a finite number, got {weight!r}")
    kwargs = dict(kwargs)
    fn = functools.partial(target, **kwargs) if kwargs else target
    return RewardFunction(name=name, fn=fn, weight=float(weight), kwargs=kwargs)


def load_reward_functions(specs: Sequence[Mapping[str, Any]]) -> list[RewardFunction]:
    """Resolve reward specs ``{"name": str, "weight": float = 1.0, "kwargs": dict = {}}``.

    ``name`` is a key of ``BUILTIN_REWARDS`` or ``"package.module:function"``. Raises ValueError
    for an unknown built-in (listing the built-ins), an unimportable module (with the original
    error's type and message; the original is chained), a missing or non-callable attribute,
    unknown spec keys, a non-mapping ``kwargs``, a non-finite ``weight``, or two rewards with the
    same name (their metrics would collide). Every message is one line that starts with the
    spec's config key (specs are the config's ``online.rewards``) and name, e.g.
    ``online.rewards[1] 'my_mod:fn': cannot import module 'my_mod': SyntaxError: invalid syntax
    (my_mod.py, line 3)``.
    """
    loaded: list[RewardFunction] = []
    for i, spec in enumerate(specs):
        name = spec.get("name") if isinstance(spec, Mapping) else None
        label = f"online.rewards[{i}]" + (f" {name!r}" if isinstance(name, str) else "")
        try:
            reward = _load_one(spec)
        except ValueError as err:
            # Chain the user's import error (if any), not this ValueError, whose text is repeated.
            raise ValueError(f"{label}: {err}") from err.__cause__
        if any(r.name == reward.name for r in loaded):
            raise ValueError(f"{label}: reward {reward.name!r} is listed twice; its metrics would collide")
        loaded.append(reward)
    return loaded


# --------------------------------------------------------------------------------------------
# Scoring a batch
# --------------------------------------------------------------------------------------------


def _as_rewards(name: str, output: Any, expected: int) -> list[float]:
    """The rewards as floats, NaN for None (the only way to say "not applicable"): a NaN or inf
    returned by the function is an error, not silently read as None."""
    if hasattr(output, "tolist"):  # numpy arrays and tensors, which TRL also accepts
        output = output.tolist()
    if isinstance(output, (str, bytes)) or not isinstance(output, Sequence):
        raise ValueError(f"reward function '{name}' must return a list, got {type(output).__name__}")
    if len(output) != expected:
        raise ValueError(f"reward function '{name}' returned {len(output)} rewards, expected {expected}")
    values = []
    for i, value in enumerate(output):
        if value is None:
            values.append(math.nan)
        elif not isinstance(value, numbers.Real):
            raise ValueError(
                f"reward function '{name}' returned a non-numeric reward for sample {i}: {value!r} "
                f"({type(value).__name__}); expected float or None"
            )
        elif not math.isfinite(value):
            raise ValueError(
                f"reward function '{name}' returned {float(value)} for sample {i} "
                "(return None for 'not applicable')"
            )
        else:
            values.append(float(value))
    return values


def _check_finite(
    reward_fns: Sequence[RewardFunction], per_fn: Tensor, weighted: Tensor, total: Tensor
) -> None:
    """Raise where a finite reward overflows float32: by itself, times its weight, or in the sum."""
    # per_fn is NaN exactly where a function returned None; anywhere else weighted must be finite.
    overflow = (~weighted.isfinite() & ~per_fn.isnan()).nonzero()
    if len(overflow):
        i, f = overflow[0].tolist()
        raise ValueError(
            f"reward function '{reward_fns[f].name}': its reward for sample {i} times weight "
            f"{reward_fns[f].weight:g} overflows float32"
        )
    overflow = total.isinf().nonzero()
    if len(overflow):
        raise ValueError(f"the weighted rewards of sample {overflow[0].item()} sum past float32's range")


def compute_rewards(
    reward_fns: Sequence[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
) -> tuple[Tensor, Tensor]:
    """Run every reward function on the batch and combine them.

    Each function is called as ``fn(prompts, completions, **columns)``.

    Returns:
        per_fn: (N, F) float32, NaN where a function returned None.
        total: (N,) ``nansum_f weight_f * per_fn[:, f]`` (as TRL): a None drops that function
            from the sample's sum, and a sample every function returned None for gets 0.

    Raises:
        RuntimeError: a function raised (chained from the original exception, naming it).
        ValueError: a function returned the wrong number of rewards, a non-numeric one, NaN or
            +-inf (naming it and the sample), or a reward that, times its weight or summed into
            the total, overflows float32.
    """
    n = len(completions)
    columns_out = []
    for reward in reward_fns:
        try:
            output = reward.fn(prompts, completions, **columns)
        except Exception as err:
            raise RuntimeError(f"reward function '{reward.name}' failed: {err!r}") from err
        columns_out.append(_as_rewards(reward.name, output, n))
    per_fn = torch.tensor(columns_out, dtype=torch.float32).reshape(len(reward_fns), n).T.contiguous()
    weights = torch.tensor([r.weight for r in reward_fns], dtype=torch.float32)
    weighted = per_fn * weights
    total = weighted.nansum(dim=1)
    _check_finite(reward_fns, per_fn, weighted, total)
    return per_fn, total


def _nanstd(x: Tensor) -> Tensor:
    """Unbiased std over the non-NaN entries (NaN when fewer than 2)."""
    valid = x[~x.isnan()]
    return valid.std() if valid.numel() > 1 else x.new_tensor(math.nan)


def reward_metrics(per_fn: Tensor, total: Tensor, reward_fns: Sequence[RewardFunction]) -> dict[str, float]:
    """Batch reward summary under TRL's names.

    ``reward``: mean of ``total``; ``reward_std``: its unbiased std over the batch;
    ``rewards/<name>/mean`` and ``rewards/<name>/std``: over the samples where that function
    applied (non-NaN). A std over fewer than 2 values, or a function that applied to nothing,
    gives NaN.
    """
    names = ["reward", "reward_std"]
    values = [total.mean(), _nanstd(total)]
    for i, reward in enumerate(reward_fns):
        names += [f"rewards/{reward.name}/mean", f"rewards/{reward.name}/std"]
        values += [per_fn[:, i].nanmean(), _nanstd(per_fn[:, i])]
    return dict(zip(names, torch.stack(values).tolist()))


def reward_columns(records: Sequence[Mapping[str, Any]], completion_ids: Sequence[Sequence[int]],
                   terminated: Sequence[bool], num_generations: int) -> dict[str, list]:
    """The keyword columns reward functions receive beside prompts and completions: every extra
    dataset column of `records` repeated G = `num_generations` times (aligned with the
    completions, a prompt's G adjacent), plus `completion_ids` (each completion's token ids, EOS
    included when it ended with one) and `terminated` (True when it ended with EOS)."""
    keys = sorted({k for r in records for k in r if k != "prompt"})
    columns: dict[str, list] = {k: [r.get(k) for r in records for _ in range(num_generations)] for k in keys}
    columns["completion_ids"] = [list(ids) for ids in completion_ids]
    columns["terminated"] = list(terminated)
    return columns
