r"""Reward functions for online GRPO: built-ins, the calling convention, and batched scoring.

Reward functions follow TRL's (1.16) ``GRPOTrainer`` convention, so TRL users keep theirs.
Every function is called with keywords only::

    fn(prompts=..., completions=..., completion_ids=..., trainer_state=...,
       log_extra=..., log_metric=..., **columns) -> list[float | None]

- ``prompts``/``completions``: one per completion (a prompt repeated for its G completions).
  Strings for plain data; for conversational data (prompts are chat message lists) ``prompts``
  are the message lists and each completion is ``[{"role": "assistant", "content": text}]``
  (``as_conversational``), as TRL passes them.
- ``completion_ids``: list[list[int]], each completion's token ids.
- ``trainer_state``: a ``TrainerState`` (``global_step``, ``max_steps``, ``epoch``), for rewards
  shaped by training progress; None outside training.
- ``log_extra(column, values)``: add a column (one value per completion) to the step's
  completions log; ``log_metric(name, value)``: add a scalar averaged into the step's metrics.
  Both land in the ``RewardLogs`` passed to ``compute_rewards``.
- ``columns``: every extra dataset column repeated G times, plus ``terminated`` (list[bool]:
  True when the completion ended with EOS rather than at the length limit); see
  ``reward_columns``. A spec's column mapping renames columns for one function.

So ``def f(prompts, completions, **kwargs)``, ``def f(completions, **kwargs)``,
``def f(completion_ids, **kwargs)`` and keyword-only signatures all work; a function should take
``**kwargs`` so keywords it does not use do not break it. Return one finite float per completion,
or None where the reward does not apply to that sample (a NaN or inf is an error, never read as
None). ``async def`` functions (and callables with an ``async def __call__``) run concurrently,
after the synchronous ones, as in TRL.

``grpo_fast.reward_models.load_reward_functions`` resolves the config's reward specs into
``RewardFunction``s, ``compute_rewards`` runs them on a batch and combines them,
``reward_metrics`` summarizes the result under TRL's metric names. This module imports nothing
of grpo_fast and never transformers.

Built-ins (``BUILTIN_REWARDS``): ``math_answer``, ``format``, ``length``, ``exact_match``; each
takes plain or conversational completions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BUILTIN_REWARDS",
    "REWARD_KEYWORDS",
    "RewardFunction",
    "RewardLogs",
    "TrainerState",
    "as_conversational",
    "completion_text",
    "compute_rewards",
    "exact_match_reward",
    "extract_answer",
    "format_reward",
    "length_reward",
    "math_answer_reward",
    "reward_columns",
    "reward_metrics",
]

RewardFn = Callable[..., Sequence[Any]]

# --------------------------------------------------------------------------------------------
# Plain and conversational data
# --------------------------------------------------------------------------------------------


def as_conversational(texts: Iterable[str]) -> list[list[dict[str, str]]]:
    """Completion texts in TRL's conversational form: one assistant message each."""
    return [[{"role": "assistant", "content": text}] for text in texts]


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """A plain completion itself, or a conversational one's last message content (with tool
    calls the final answer is in the last assistant message)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


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
    completions: Sequence[Any],
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
        predicted = extract_answer(completion_text(completion))
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
    completions: Sequence[Any],
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
    return [1.0 if compiled.fullmatch(completion_text(c).strip()) else 0.0 for c in completions]


def length_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    target: int = 256,
    completion_ids: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> list[float]:
    """Penalty for running past ``target``: 0 up to it, then -(excess / target), floored at -1.

    Length is in tokens (``len(completion_ids[i])``) when the ``completion_ids`` column is given,
    which the rollout always does, and in characters of the completion text otherwise;
    ``target`` is in the same unit.
    Reaches -1 at twice the target.
    """
    if target <= 0:
        raise ValueError(f"length reward target must be > 0, got {target}")
    if completion_ids is not None:
        lengths = [len(ids) for ids in completion_ids]
    else:
        lengths = [len(completion_text(c)) for c in completions]
    return [max(-1.0, min(0.0, (target - n) / target)) for n in lengths]


def exact_match_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
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
        1.0 if done and completion_text(completion).strip() == str(ref).strip() else 0.0
        for completion, ref, done in zip(completions, answer, terminated, strict=True)
    ]


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math_answer": math_answer_reward,
    "format": format_reward,
    "length": length_reward,
    "exact_match": exact_match_reward,
}


# --------------------------------------------------------------------------------------------
# Resolved rewards and what they are called with
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardFunction:
    """A resolved reward (``grpo_fast.reward_models.load_reward_functions`` builds them from
    specs). ``fn`` already has the spec's ``kwargs`` bound (functools.partial), or is what the
    spec's factory returned, or a ``grpo_fast.reward_models.RewardModel``.

    ``name`` keys the ``rewards/<name>/...`` metrics: the built-in name, the function's
    ``__name__`` (a callable object's class name), as TRL names custom rewards, or a reward
    model's basename. ``columns`` maps a keyword ``fn`` receives to the dataset column it is read
    from.
    """

    name: str
    fn: RewardFn
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    columns: dict[str, str] = field(default_factory=dict)


# The keywords compute_rewards passes every function itself; no column mapping may set one.
# completion_ids travels in `columns` (reward_columns builds it), so only the others may not be
# dataset columns.
REWARD_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
_RESERVED_COLUMNS = tuple(k for k in REWARD_KEYWORDS if k != "completion_ids")


@dataclass
class TrainerState:
    """Training progress as reward functions see it (``trainer_state``), under the field names
    of transformers' TrainerState, which TRL passes: ``global_step`` counts the optimizer steps
    done (0 while the first step's completions are scored), ``max_steps`` the steps the run will
    take, ``epoch`` the (fractional) passes over the prompts so far."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


@dataclass
class RewardLogs:
    """What reward functions logged through ``log_extra`` and ``log_metric``.

    ``extra``: column -> one value per completion scored into these logs (None for the
    completions of a ``compute_rewards`` call in which no function logged that column), for the
    completions log; a column logged twice in one call keeps the last values. ``metrics``:
    name -> every value logged; ``metric_means()`` averages them for the step's metrics row, as
    TRL averages over its logging step. ``num_rows``: completions scored into these logs.
    """

    extra: dict[str, list[Any]] = field(default_factory=dict)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    num_rows: int = 0

    def metric_means(self) -> dict[str, float]:
        return {name: sum(values) / len(values) for name, values in self.metrics.items()}

    def _add(self, extra: Mapping[str, list[Any]], metrics: Iterable[tuple[str, float]], n: int) -> None:
        """One call's logs: ``n`` more rows; columns are padded with None to stay row-aligned."""
        for column in extra:
            self.extra.setdefault(column, [None] * self.num_rows)
        for column, values in self.extra.items():
            values.extend(extra.get(column, [None] * n))
        for name, value in metrics:
            self.metrics.setdefault(name, []).append(value)
        self.num_rows += n


class _FunctionLog:
    """One function's ``log_extra``/``log_metric`` calls, checked after it returns (so a bad call
    is reported by the function's name) and merged in spec order, whatever order async functions
    finish in."""

    def __init__(self) -> None:
        self.extra: dict[Any, list[Any]] = {}
        self.metrics: list[tuple[Any, Any]] = []

    def log_extra(self, column: str, values: list) -> None:
        self.extra[column] = list(values)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.append((name, value))

    def checked(self, fn_name: str, n: int) -> tuple[dict[str, list[Any]], list[tuple[str, float]]]:
        for column, values in self.extra.items():
            if not isinstance(column, str):
                raise ValueError(f"reward function '{fn_name}' called log_extra with a {type(column).__name__} "
                                 "column name; expected str")
            if len(values) != n:
                raise ValueError(f"reward function '{fn_name}' logged {len(values)} values for column "
                                 f"{column!r}, expected {n} (one per completion)")
        metrics = []
        for name, value in self.metrics:
            if torch.is_tensor(value) and value.numel() == 1:
                value = value.item()
            if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"reward function '{fn_name}' called log_metric({name!r:.40}, {value!r:.40}); "
                                 "expected a str name and a real number")
            metrics.append((name, float(value)))
        return self.extra, metrics


def _is_async(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns a coroutine, as TRL tells: through functools.partial, and
    for callable objects by their ``__call__``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


_event_loop_lock = threading.Lock()
_event_loop: asyncio.AbstractEventLoop | None = None


def _async_loop() -> asyncio.AbstractEventLoop:
    """The event loop async reward functions run on: one per process, in a daemon thread, as
    TRL's. It works whether or not the caller runs a loop itself, and clients that a reward
    module binds to the loop (an aiohttp session, an httpx.AsyncClient) keep working from step to
    step, which a fresh asyncio.run per batch would break."""
    global _event_loop
    with _event_loop_lock:
        if _event_loop is None:
            _event_loop = asyncio.new_event_loop()
            threading.Thread(target=_event_loop.run_forever, name="grpo-fast-async-rewards", daemon=True).start()
        return _event_loop


def _run_concurrently(calls: Sequence[tuple[RewardFunction, dict[str, Any]]]) -> list[Any]:
    """Await every async reward call at once (asyncio.gather); raise for the first, in spec
    order, that failed."""

    async def call(reward: RewardFunction, kwargs: dict[str, Any]) -> Any:
        return await reward.fn(**kwargs)

    async def gather() -> list[Any]:
        return await asyncio.gather(*(call(reward, kwargs) for reward, kwargs in calls), return_exceptions=True)

    results = asyncio.run_coroutine_threadsafe(gather(), _async_loop()).result()
    for (reward, _), result in zip(calls, results):
        if isinstance(result, BaseException):
            raise RuntimeError(f"reward function '{reward.name}' failed: {result!r}") from result
    return results


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


def _call_kwargs(
    reward: RewardFunction, shared: Mapping[str, Any], columns: Mapping[str, Sequence[Any]], log: _FunctionLog
) -> dict[str, Any]:
    """The keywords one function is called with: the shared ones, its column mapping, its log."""
    kwargs = {**shared, "log_extra": log.log_extra, "log_metric": log.log_metric}
    for keyword, column in reward.columns.items():
        if column not in columns:
            raise ValueError(f"reward function '{reward.name}' reads dataset column {column!r} as {keyword!r}, "
                             f"but the batch has no such column (it has {sorted(columns)})")
        kwargs[keyword] = columns[column]
    return kwargs


def compute_rewards(
    reward_fns: Sequence[RewardFunction],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    *,
    trainer_state: TrainerState | None = None,
    logs: RewardLogs | None = None,
) -> tuple[Tensor, Tensor]:
    """Run every reward function on the batch and combine them.

    Each function is called as TRL calls it, keywords only: ``fn(prompts=prompts,
    completions=completions, completion_ids=columns["completion_ids"] (None if absent),
    trainer_state=trainer_state, log_extra=..., log_metric=..., **columns)``, with its spec's
    column mapping applied. ``prompts`` and ``completions`` are passed through as given (strings,
    or for conversational data message lists: see ``as_conversational``). Synchronous functions
    run first, in order, then the async ones together on one event loop. What they log goes to
    ``logs`` (pass a fresh ``RewardLogs`` per step), and only once every function has succeeded.

    Returns:
        per_fn: (N, F) float32, NaN where a function returned None.
        total: (N,) ``nansum_f weight_f * per_fn[:, f]`` (as TRL): a None drops that function
            from the sample's sum, and a sample every function returned None for gets 0.

    Raises:
        RuntimeError: a function raised (chained from the original exception, naming it).
        ValueError: a function returned the wrong number of rewards, a non-numeric one, NaN or
            +-inf (naming it and the sample), or a reward that, times its weight or summed into
            the total, overflows float32; a function logged a column of the wrong length or a
            non-numeric metric; a column mapping names a column the batch lacks; a dataset column
            has the name of one of the keywords above.
    """
    n = len(completions)
    clash = [k for k in _RESERVED_COLUMNS if k in columns]
    if clash:
        raise ValueError(f"dataset column {clash[0]!r} has the name of a reward-function keyword; rename it")
    shared = {**columns, "prompts": prompts, "completions": completions,
              "completion_ids": columns.get("completion_ids"), "trainer_state": trainer_state}
    fn_logs = [_FunctionLog() for _ in reward_fns]
    calls = [(reward, _call_kwargs(reward, shared, columns, log)) for reward, log in zip(reward_fns, fn_logs)]

    outputs: list[Any] = [None] * len(calls)
    async_calls = [i for i, (reward, _) in enumerate(calls) if _is_async(reward.fn)]
    for i, (reward, kwargs) in enumerate(calls):
        if _is_async(reward.fn):
            continue
        try:
            outputs[i] = reward.fn(**kwargs)
        except Exception as err:
            raise RuntimeError(f"reward function '{reward.name}' failed: {err!r}") from err
    if async_calls:
        for i, output in zip(async_calls, _run_concurrently([calls[i] for i in async_calls])):
            outputs[i] = output
    columns_out = [_as_rewards(reward.name, output, n) for reward, output in zip(reward_fns, outputs)]

    checked = [log.checked(reward.name, n) for reward, log in zip(reward_fns, fn_logs)]
    per_fn = torch.tensor(columns_out, dtype=torch.float32).reshape(len(reward_fns), n).T.contiguous()
    weights = torch.tensor([r.weight for r in reward_fns], dtype=torch.float32)
    weighted = per_fn * weights
    total = weighted.nansum(dim=1)
    _check_finite(reward_fns, per_fn, weighted, total)
    if logs is not None:
        extra: dict[str, list[Any]] = {}
        for fn_extra, _ in checked:
            extra.update(fn_extra)
        logs._add(extra, [m for _, fn_metrics in checked for m in fn_metrics], n)
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
    # "prompt" is the rendered text the model continued and "raw_prompt" the source's prompt:
    # both reach reward functions as `prompts`, not as columns.
    keys = sorted({k for r in records for k in r if k not in ("prompt", "raw_prompt")})
    columns: dict[str, list] = {k: [r.get(k) for r in records for _ in range(num_generations)] for k in keys}
    columns["completion_ids"] = [list(ids) for ids in completion_ids]
    columns["terminated"] = list(terminated)
    return columns
