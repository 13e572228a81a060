"""Reward specs from the config resolved into reward functions, and reward models.

Config lists rewards as specs (``online.rewards``), the reward functions TRL's GRPOTrainer takes
as ``reward_funcs``::

    rewards:
      - {name: math_answer}
      - {name: math_answer, columns: {answer: solution}}      # dataset column `solution` as `answer`
      - {name: format, weight: 0.2, kwargs: {pattern: "<answer>.*?</answer>"}}
      - {name: my_rewards:brevity, weight: 0.5}                # my_rewards.py beside the config
      - {name: trl.rewards:accuracy_reward}
      - {name: "trl.rewards:get_soft_overlong_punishment", factory: true,
         kwargs: {max_completion_len: 256, soft_punish_cache: 32}}
      - {model: path/or/hub-id, weight: 0.5}                   # sequence-classification reward model

Keys: ``name`` (a built-in of ``grpo_fast.rewards.BUILTIN_REWARDS``, or
``"package.module:function"``), ``weight`` (default 1.0), ``kwargs`` (bound to the function;
with ``factory: true`` passed to ``name``, a factory whose return value is the reward function;
with ``model`` passed to ``from_pretrained``, plus ``batch_size``), ``columns``
(``{keyword: dataset_column}``: the function receives that dataset column under that keyword)
and ``model`` (a reward model; ``name`` then optionally renames its metrics).
``load_reward_functions`` returns ``grpo_fast.rewards.RewardFunction``s for ``compute_rewards``.

A reward model (``AutoModelForSequenceClassification``, ``num_labels=1``, and its tokenizer)
scores each completion, as TRL's GRPOTrainer does, by its first logit on prompt + completion:
the text ``prompt + completion`` for plain data; for conversational data (prompts are chat
message lists) the tokenizer's chat template applied to the ``prompt + completion`` messages (no
generation prompt), as TRL's ``apply_chat_template`` renders ``{"messages": ...}``. Tokenized
without special tokens (the template has them), right-padded, in batches of ``batch_size``,
without gradients, on the device it was loaded to (the policy's). It is named, as TRL names it,
after the last component of its directory or hub id. transformers is imported only when a model
spec is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .rewards import BUILTIN_REWARDS, REWARD_KEYWORDS, RewardFunction

__all__ = ["RewardModel", "load_reward_functions", "load_reward_model", "reward_model_name"]

# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

_SPEC_KEYS = frozenset({"name", "weight", "kwargs", "model", "factory", "columns"})


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line (a SyntaxError's or a user exception's may span several)."""
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _callable_name(fn: Callable[..., Any]) -> str:
    """The name TRL logs a reward function under: its ``__name__`` (through functools.partial),
    else the class name of a callable object."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


@contextlib.contextmanager
def _on_import_path(search_paths: Sequence[str | os.PathLike[str]]) -> Iterator[None]:
    """``search_paths`` ahead of sys.path for the duration, then exactly those entries removed
    again (a module imported meanwhile stays imported, and whatever it added to sys.path stays)."""
    added = [p for p in dict.fromkeys(map(os.fspath, search_paths)) if p not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for path in added:
            if path in sys.path:
                sys.path.remove(path)


def _import_object(path: str, search_paths: Sequence[str | os.PathLike[str]]) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError("expected 'package.module:function'")
    try:
        with _on_import_path(search_paths):
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


def _spec_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"'kwargs' must be a mapping, got {type(kwargs).__name__}")
    return dict(kwargs)


def _spec_weight(spec: Mapping[str, Any]) -> float:
    weight = spec.get("weight", 1.0)
    # A non-finite weight would make every total inf or NaN.
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"'weight' must be a finite number, got {weight!r}")
    return float(weight)


def _spec_columns(spec: Mapping[str, Any]) -> dict[str, str]:
    columns = spec.get("columns") or {}
    if not isinstance(columns, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in columns.items()
    ):
        raise ValueError(f"'columns' must map keywords to dataset column names (strings), got {columns!r:.80}")
    reserved = [k for k in columns if k in REWARD_KEYWORDS]
    if reserved:
        raise ValueError(f"'columns' cannot set {reserved[0]!r}: every reward function receives it already")
    return dict(columns)


def _load_model_spec(spec: Mapping[str, Any], device: torch.device | str | None) -> RewardFunction:
    # Config's RewardSpec has every key: an empty name, factory false and no columns are unset.
    source, name = spec["model"], spec.get("name") or None
    if not isinstance(source, str) or not source:
        raise ValueError(f"'model' must be a local directory or hub id (a non-empty string), got {source!r:.80}")
    if name is not None and not isinstance(name, str):
        raise ValueError(f"'name' of a model reward must be a string, got {name!r:.80}")
    if spec.get("factory") or spec.get("columns"):
        raise ValueError("a 'model' reward takes no 'factory' or 'columns': it scores prompt + completion")
    kwargs, weight = _spec_kwargs(spec), _spec_weight(spec)
    try:
        model = load_reward_model(source, device=device, **kwargs)
    except Exception as err:  # OSError, ValueError, a bad kwarg's TypeError: all "does not load"
        raise ValueError(f"cannot load reward model {source!r}: {_one_line(err)}") from err
    return RewardFunction(name=name or reward_model_name(source), fn=model, weight=weight, kwargs=kwargs)


def _load_one(
    spec: Any, search_paths: Sequence[str | os.PathLike[str]], device: torch.device | str | None
) -> RewardFunction:
    """One spec resolved; a ValueError here says what is wrong, the caller says which spec."""
    unknown = set(spec) - _SPEC_KEYS if isinstance(spec, Mapping) else set()
    if unknown:
        raise ValueError(f"unknown spec keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    if isinstance(spec, Mapping) and spec.get("model") is not None:
        return _load_model_spec(spec, device)
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError(
            f"reward spec must be a mapping with a 'name' (a non-empty string) or a 'model', got {spec!r:.80}"
        )
    factory = spec.get("factory", False)
    if not isinstance(factory, bool):
        raise ValueError(f"'factory' must be true or false, got {factory!r:.80}")
    kwargs, weight, columns = _spec_kwargs(spec), _spec_weight(spec), _spec_columns(spec)
    name = spec["name"]
    if ":" in name:
        target = _import_object(name, search_paths)
    elif name in BUILTIN_REWARDS:
        if factory:
            raise ValueError("'factory: true' needs an import path 'package.module:factory'; built-ins are "
                             "reward functions, not factories")
        target = BUILTIN_REWARDS[name]
    else:
        raise ValueError(
            f"unknown reward; built-ins are {sorted(BUILTIN_REWARDS)}, "
            "or give an import path 'package.module:function'"
        )
    if factory:
        try:
            fn = target(**kwargs)
        except Exception as err:  # the factory is user code: report whatever it raised
            raise ValueError(f"factory raised {_one_line(err)}") from err
        if not callable(fn):
            raise ValueError(f"factory returned a {type(fn).__name__}, not a reward function")
    else:
        fn = functools.partial(target, **kwargs) if kwargs else target
    # Built-ins keep their short names; anything imported is named as TRL names it.
    metric_name = name if name in BUILTIN_REWARDS else _callable_name(fn)
    return RewardFunction(name=metric_name, fn=fn, weight=weight, kwargs=kwargs, columns=columns)


def load_reward_functions(
    specs: Sequence[Mapping[str, Any]],
    *,
    search_paths: Sequence[str | os.PathLike[str]] = (),
    device: torch.device | str | None = None,
) -> list[RewardFunction]:
    """Resolve reward specs (see the module docstring for every key) for ``compute_rewards``.

    ``name`` is a key of ``BUILTIN_REWARDS`` or ``"package.module:function"``, imported with
    ``search_paths`` (the trainer passes the config file's directory and the working directory)
    ahead of sys.path for that import only: a module imported from there that imports a sibling
    module later, inside a reward call, must do so at import time instead. ``device`` is where
    ``model`` rewards are loaded (the policy's device; None: CPU).

    Raises ValueError for an unknown built-in (listing the built-ins), an unimportable module
    (with the original error's type and message; the original is chained), a missing or
    non-callable attribute, a factory that raises or returns a non-callable, a reward model that
    does not load, unknown spec keys, a non-mapping ``kwargs`` or ``columns``, a non-finite
    ``weight``, or two rewards with the same name (their metrics would collide). Every message is
    one line that starts with the spec's config key (specs are the config's ``online.rewards``)
    and name, e.g. ``online.rewards[1] 'my_mod:fn': cannot import module 'my_mod': SyntaxError:
    invalid syntax (my_mod.py, line 3)``.
    """
    loaded: list[RewardFunction] = []
    for i, spec in enumerate(specs):
        label = f"online.rewards[{i}]"
        if isinstance(spec, Mapping):
            named = spec.get("name") or spec.get("model")
            label += f" {named!r}" if isinstance(named, str) else ""
        try:
            reward = _load_one(spec, search_paths, device)
        except ValueError as err:
            # Chain the user's import error (if any), not this ValueError, whose text is repeated.
            raise ValueError(f"{label}: {err}") from err.__cause__
        if any(r.name == reward.name for r in loaded):
            raise ValueError(f"{label}: reward {reward.name!r} is listed twice; its metrics would collide")
        loaded.append(reward)
    return loaded


# --------------------------------------------------------------------------------------------
# Sequence-classification reward models
# --------------------------------------------------------------------------------------------


def reward_model_name(source: str) -> str:
    """The metric name of a reward model: the last component of its directory or hub id
    (TRL's ``_name_or_path.split("/")[-1]``; a trailing slash does not empty it here)."""
    return source.rstrip("/").split("/")[-1]


class RewardModel:
    """A reward function ``(prompts, completions, **kwargs) -> list[float]`` scoring with a
    sequence-classification model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 32) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def _texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        if not prompts or isinstance(prompts[0], str):
            return [p + c for p, c in zip(prompts, completions, strict=True)]
        if self.tokenizer.chat_template is None:
            raise ValueError("conversational prompts need a chat template, and the reward model's tokenizer has none")
        return [self.tokenizer.apply_chat_template([*p, *c], tokenize=False)
                for p, c in zip(prompts, completions, strict=True)]

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        texts = self._texts(prompts, completions)
        device = next(self.model.parameters()).device
        rewards: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False).to(device)
            rewards += self.model(**batch).logits[:, 0].float().tolist()
        return rewards


def load_reward_model(source: str, *, device: torch.device | str | None = None, batch_size: int = 32,
                      **from_pretrained_kwargs: Any) -> RewardModel:
    """The reward model at ``source`` (a local directory or hub id) on ``device`` (None: CPU),
    in eval mode. ``from_pretrained_kwargs`` (e.g. ``dtype="bfloat16"``, ``revision``) go to
    ``AutoModelForSequenceClassification.from_pretrained``. Raises what transformers raises when
    it does not load (``load_reward_functions`` turns that into a one-line error)."""
    # Imported here so that rewards without a model never import transformers.
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"'batch_size' must be a positive integer, got {batch_size!r}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **from_pretrained_kwargs)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("its tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    # The model scores the last non-pad token of each row, which it finds by this id.
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False).eval().to(device or "cpu")
    return RewardModel(model, tokenizer, batch_size=batch_size)
