"""Tests for grpo_fast.rewards (built-in rewards, batch scoring) and loading specs
(grpo_fast.reward_models.load_reward_functions).

TRL compatibility (calling convention, trl.rewards, async, logs, reward models) is in
test_rewards_trl.py."""

import math
import re
import textwrap

import pytest
import torch

from grpo_fast.rewards import (
    BUILTIN_REWARDS,
    RewardFunction,
    as_conversational,
    compute_rewards,
    exact_match_reward,
    extract_answer,
    format_reward,
    length_reward,
    math_answer_reward,
    reward_metrics,
)
from grpo_fast.reward_models import load_reward_functions


def _math(completion, answer, **kwargs):
    return math_answer_reward(["p"], [completion], answer=[answer], **kwargs)[0]


# --------------------------------------------------------------------------------------------
# math_answer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        (r"so the result is \boxed{\frac{1}{2}}.", 0.5),
        (r"\boxed{\dfrac{3}{4}}", "0.75"),
        (r"\boxed{-\frac{1}{2}}", -0.5),
        (r"\boxed{\frac12}", "#### 0.5"),
        (r"we get $\boxed{\text{x} = 1{,}234}$ apples", 1234),
        (r"first \boxed{3}, then corrected: \boxed{\left(7\right)}", 7),
        ("#### 1,234", 1234),
        ("so she pays $1,234.50.", "1234.5"),
        ("The temperature drops to -15 degrees.", -15),
        ("It is 3.75", "3.75"),
        ("half: 1/2", 0.5),
        ("pages 5-6", 6),
        ("the answer is 72.", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"),
        ("#### 72\nsome trailing chatter with 5 numbers", 72),
        ("x \u2212 3 = 0 so x is \u22123", -3),
    ],
)
def test_math_answer_accepts_equivalent_answers(completion, answer):
    assert _math(completion, answer) == 1.0


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("no number here", 3),
        (r"\boxed{\text{none}} although 3 appeared earlier", 3),
        (r"\boxed{4}", 3),
        ("The answer is 3.5", 3),
        ("1,2,3", 123),
        ("-4", 4),
    ],
)
def test_math_answer_rejects_wrong_or_missing_answers(completion, answer):
    assert _math(completion, answer) == 0.0


def test_math_answer_tolerance_and_unparseable_reference():
    assert _math("0.3333333", 1 / 3) == 1.0  # within the default 1e-6
    assert _math("0.333", 1 / 3) == 0.0
    assert _math("0.333", 1 / 3, tolerance=1e-3) == 1.0
    assert _math("42", "no reference number") is None


def test_extract_answer_handles_unclosed_box_and_zero_denominator():
    assert extract_answer(r"\boxed{12") == 12.0  # truncated box: falls back to the last number
    assert extract_answer("1/0") is None
    assert extract_answer(".5") == 0.5


# --------------------------------------------------------------------------------------------
# format, length, exact_match
# --------------------------------------------------------------------------------------------


def test_format_default_pattern():
    completions = [
        "<think>step 1\nstep 2</think>\n<answer>42</answer>",
        "  <think>x</think><answer>y</answer>\n",
        "<answer>42</answer>",
        "<think>x</think><answer>y</answer> trailing text",
    ]
    assert format_reward(["p"] * 4, completions) == [1.0, 1.0, 0.0, 0.0]


def test_format_custom_pattern_and_ignored_columns():
    completions = ["Answer: 12", "I think 12"]
    columns = {"answer": ["12", "12"], "terminated": [True, True]}
    rewards = format_reward(["p", "p"], completions, pattern=r"Answer: \d+", **columns)
    assert rewards == [1.0, 0.0]


def test_length_counts_tokens_when_given_else_characters():
    completions = ["a" * 10, "a" * 15, "a" * 20, "a" * 50]
    assert length_reward(["p"] * 4, completions, target=10) == [0.0, -0.5, -1.0, -1.0]
    ids = [[1] * 4, [1] * 12]
    # Token counts (4 and 12) win over the 10- and 15-character strings.
    assert length_reward(["p"] * 2, completions[:2], target=8, completion_ids=ids) == [0.0, -0.5]
    assert math.copysign(1.0, length_reward(["p"], ["a"], target=5)[0]) == 1.0  # 0.0, not -0.0
    with pytest.raises(ValueError, match="target"):
        length_reward(["p"], ["a"], target=0)


def test_exact_match_requires_termination_when_given():
    completions = [" 42\n", "42", "42", "41"]
    answers = [42, "42", "42", "42"]
    assert exact_match_reward(["p"] * 4, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0]
    terminated = [True, True, False, True]
    rewards = exact_match_reward(["p"] * 4, completions, answer=answers, terminated=terminated)
    assert rewards == [1.0, 1.0, 0.0, 0.0]


def test_builtins_take_conversational_completions():
    texts = [r"\boxed{3}", "<think>x</think><answer>3</answer>", " 3 "]
    chats = as_conversational(texts)
    assert chats[0] == [{"role": "assistant", "content": texts[0]}]
    prompts = [[{"role": "user", "content": "1+2?"}]] * 3
    answers = ["3"] * 3
    for fn, kwargs in [(math_answer_reward, {"answer": answers}), (format_reward, {}),
                       (length_reward, {"target": 4}), (exact_match_reward, {"answer": answers})]:
        assert fn(prompts, chats, **kwargs) == fn(["p"] * 3, texts, **kwargs), fn.__name__
    assert exact_match_reward(prompts, chats, answer=answers) == [0.0, 0.0, 1.0]
    assert length_reward(prompts, chats, target=4) == [-1.0, -1.0, 0.0]  # characters of the content
    # A multi-message completion (tool use) is read from its last message.
    tool_use = [[{"role": "assistant", "content": "call"}, {"role": "tool", "content": "7"},
                 {"role": "assistant", "content": "it is 7"}]]
    assert math_answer_reward(prompts[:1], tool_use, answer=["7"]) == [1.0]


def test_builtins_ignore_unknown_columns():
    columns = {"answer": ["3"], "completion_ids": [[5, 6]], "terminated": [True], "difficulty": ["hard"]}
    for fn in BUILTIN_REWARDS.values():
        assert len(fn(["p"], ["3"], **columns)) == 1


# --------------------------------------------------------------------------------------------
# load_reward_functions
# --------------------------------------------------------------------------------------------


def test_load_builtins_with_weights_and_kwargs():
    loaded = load_reward_functions(
        [{"name": "math_answer"}, {"name": "format", "weight": 0.5, "kwargs": {"pattern": r"\d+"}}]
    )
    assert [(r.name, r.weight) for r in loaded] == [("math_answer", 1.0), ("format", 0.5)]
    assert loaded[0].fn is math_answer_reward
    assert loaded[1].kwargs == {"pattern": r"\d+"}
    assert loaded[1].fn(["p", "p"], ["12", "x"]) == [1.0, 0.0]


def test_load_unknown_builtin_lists_builtins():
    builtins = r"'exact_match', 'format', 'length', 'math_answer'"
    with pytest.raises(ValueError, match=rf"^online\.rewards\[0\] 'accuracy': unknown reward.*{builtins}"):
        load_reward_functions([{"name": "accuracy"}])


def test_load_bad_import_path_names_module_and_error():
    expected = r"cannot import module 'no_such_pkg\.rewards'.*ModuleNotFoundError"
    with pytest.raises(ValueError, match=expected) as info:
        load_reward_functions([{"name": "no_such_pkg.rewards:fn"}])
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_load_function_from_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        textwrap.dedent(
            """
            NOT_CALLABLE = 3

            def brevity(prompts, completions, scale=1.0, **kwargs):
                return [scale / (1 + len(c)) for c in completions]
            """
        )
    )
    (tmp_path / "broken_rewards_mod.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    spec = {"name": "my_rewards_mod:brevity", "weight": 2.0, "kwargs": {"scale": 3.0}}
    [reward] = load_reward_functions([spec])
    assert reward.name == "brevity"
    assert reward.weight == 2.0
    assert reward.fn(["p"], ["ab"]) == [1.0]

    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward_functions([{"name": "my_rewards_mod:missing"}])
    with pytest.raises(ValueError, match="not a callable"):
        load_reward_functions([{"name": "my_rewards_mod:NOT_CALLABLE"}])
    with pytest.raises(ValueError, match=r"'broken_rewards_mod'.*boom at import"):
        load_reward_functions([{"name": "broken_rewards_mod:fn"}])


def test_load_errors_are_one_line_naming_spec_and_cause(tmp_path, monkeypatch):
    (tmp_path / "syntax_rewards_mod.py").write_text("x = 1\ny = 2\nz = = 3\n")
    (tmp_path / "raising_rewards_mod.py").write_text("raise RuntimeError('line one\\nline two')\n")
    (tmp_path / "good_rewards_mod.py").write_text("def fn(prompts, completions, **kw):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def error(spec):
        with pytest.raises(ValueError) as info:
            load_reward_functions([{"name": "format"}, spec])
        return str(info.value)

    assert error({"name": "syntax_rewards_mod:fn"}) == (
        "online.rewards[1] 'syntax_rewards_mod:fn': cannot import module 'syntax_rewards_mod': "
        "SyntaxError: invalid syntax (syntax_rewards_mod.py, line 3)"
    )
    assert error({"name": "raising_rewards_mod:fn"}) == (
        "online.rewards[1] 'raising_rewards_mod:fn': cannot import module 'raising_rewards_mod': "
        "RuntimeError: line one line two"
    )
    assert error({"name": "good_rewards_mod:nope"}) == (
        "online.rewards[1] 'good_rewards_mod:nope': module 'good_rewards_mod' has no attribute 'nope'"
    )
    assert error({"name": "format", "weight": float("inf")}) == (
        "online.rewards[1] 'format': 'weight' must be a finite number, got inf"
    )
    assert error({"name": "length", "kwargs": ["target"]}) == (
        "online.rewards[1] 'length': 'kwargs' must be a mapping, got list"
    )
    assert error({"name": 7}).startswith("online.rewards[1]: reward spec must be a mapping with a 'name'")


def test_load_rejects_malformed_specs():
    with pytest.raises(ValueError, match="unknown spec keys"):
        load_reward_functions([{"name": "format", "kwarg": {}}])
    with pytest.raises(ValueError, match="mapping with a 'name'"):
        load_reward_functions(["format"])
    with pytest.raises(ValueError, match="listed twice"):
        load_reward_functions([{"name": "format"}, {"name": "format"}])


# --------------------------------------------------------------------------------------------
# compute_rewards and reward_metrics
# --------------------------------------------------------------------------------------------


def _reward(name, fn, weight=1.0):
    return RewardFunction(name=name, fn=fn, weight=weight)


def test_compute_rewards_weights_and_none():
    fns = [
        _reward("a", lambda prompts, completions, **kw: [1.0, 0.0, None], weight=2.0),
        _reward("b", lambda prompts, completions, **kw: [0.5, None, None], weight=-1.0),
    ]
    per_fn, total = compute_rewards(fns, ["p"] * 3, ["x", "y", "z"], {})
    assert per_fn.shape == (3, 2) and per_fn.dtype == torch.float32
    torch.testing.assert_close(per_fn, torch.tensor([[1.0, 0.5], [0.0, math.nan], [math.nan, math.nan]]),
                               equal_nan=True)
    # 2*1 - 0.5; the None of "b" drops out; all-None gives 0.
    torch.testing.assert_close(total, torch.tensor([1.5, 0.0, 0.0]))


def test_compute_rewards_passes_columns():
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(columns)
        return [float(len(ids)) for ids in columns["completion_ids"]]

    columns = {"answer": ["1", "2"], "completion_ids": [[1, 2], [3]], "terminated": [True, False]}
    _, total = compute_rewards([_reward("spy", spy)], ["p", "q"], ["a", "b"], columns)
    assert {k: seen[k] for k in columns} == columns
    # Beside the columns: TRL's keywords (test_rewards_trl.py checks what they do).
    assert set(seen) - set(columns) == {"trainer_state", "log_extra", "log_metric"}
    torch.testing.assert_close(total, torch.tensor([2.0, 1.0]))


def test_dataset_column_named_like_a_keyword_is_an_error():
    fn = _reward("a", lambda **kw: [0.0])
    with pytest.raises(ValueError, match="dataset column 'trainer_state' has the name of a reward-function keyword"):
        compute_rewards([fn], ["p"], ["c"], {"trainer_state": ["x"]})


def test_array_outputs_are_accepted():
    as_tensor = _reward("t", lambda prompts, completions, **kw: torch.tensor([1.0, 0.5]))
    per_fn, total = compute_rewards([as_tensor], ["p", "q"], ["a", "b"], {})
    torch.testing.assert_close(per_fn, torch.tensor([[1.0], [0.5]]))
    torch.testing.assert_close(total, torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_non_finite_reward_is_an_error_not_none(bad, as_tensor):
    rewards = [0.0, None, 1.0, bad]
    if as_tensor:  # a tensor cannot hold None; NaN in it must not pass for one either
        rewards = torch.tensor([0.0, 0.5, 1.0, bad])
    fn = _reward("my_fn", lambda prompts, completions, **kw: rewards)
    expected = f"reward function 'my_fn' returned {bad} for sample 3 (return None for 'not applicable')"
    with pytest.raises(ValueError) as info:
        compute_rewards([fn], ["p"] * 4, ["c"] * 4, {})
    assert str(info.value) == expected


def test_weighted_rewards_that_overflow_float32_are_an_error():
    def constant(value):
        return lambda prompts, completions, **kw: [0.0, value]

    cases = [
        ([_reward("huge", constant(1e39))], "'huge': its reward for sample 1 times weight 1 overflows"),
        ([_reward("zero_weight", constant(1e39), weight=0.0)], "'zero_weight': its reward for sample 1"),
        ([_reward("heavy", constant(1e38), weight=10.0)], "'heavy': its reward for sample 1 times weight 10"),
        ([_reward("a", constant(3e38)), _reward("b", constant(3e38))],
         "the weighted rewards of sample 1 sum past float32's range"),
    ]
    for fns, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            compute_rewards(fns, ["p"] * 2, ["c"] * 2, {})
    # Large but representable: fine.
    _, total = compute_rewards([_reward("big", constant(1e38), weight=2.0)], ["p"] * 2, ["c"] * 2, {})
    assert torch.isfinite(total).all()


def test_raising_reward_function_is_reported_by_name():
    def broken(prompts, completions, **kwargs):
        raise KeyError("answer")

    with pytest.raises(RuntimeError, match="reward function 'broken' failed") as info:
        compute_rewards([_reward("broken", broken)], ["p"], ["c"], {})
    assert isinstance(info.value.__cause__, KeyError)


def test_wrong_length_or_type_is_reported_by_name():
    short = _reward("short", lambda prompts, completions, **kw: [1.0])
    with pytest.raises(ValueError, match=r"'short' returned 1 rewards, expected 2"):
        compute_rewards([short], ["p", "q"], ["a", "b"], {})
    textual = _reward("textual", lambda prompts, completions, **kw: ["1.0"])
    with pytest.raises(ValueError, match=r"'textual' returned a non-numeric reward for sample 0"):
        compute_rewards([textual], ["p"], ["a"], {})
    scalar = _reward("scalar", lambda prompts, completions, **kw: 1.0)
    with pytest.raises(ValueError, match=r"'scalar' must return a list"):
        compute_rewards([scalar], ["p"], ["a"], {})


def test_end_to_end_with_builtins():
    fns = load_reward_functions(
        [{"name": "math_answer"}, {"name": "length", "weight": 0.5, "kwargs": {"target": 4}}]
    )
    completions = [r"\boxed{6}", "it is 6 for sure", "5"]
    columns = {"answer": ["#### 6"] * 3, "completion_ids": [[1] * 3, [1] * 6, [1]], "terminated": [True] * 3}
    per_fn, total = compute_rewards(fns, ["p"] * 3, completions, columns)
    torch.testing.assert_close(per_fn, torch.tensor([[1.0, 0.0], [1.0, -0.5], [0.0, 0.0]]))
    torch.testing.assert_close(total, torch.tensor([1.0, 0.75, 0.0]))


def test_reward_metrics_names_and_values():
    fns = [_reward("a", None), _reward("b", None)]
    per_fn = torch.tensor([[1.0, math.nan], [0.0, 2.0], [1.0, 4.0], [0.0, math.nan]])
    total = torch.tensor([1.0, 2.0, 5.0, 0.0])
    metrics = reward_metrics(per_fn, total, fns)
    assert list(metrics) == [
        "reward", "reward_std", "rewards/a/mean", "rewards/a/std", "rewards/b/mean", "rewards/b/std"
    ]
    assert metrics["reward"] == pytest.approx(2.0)
    assert metrics["reward_std"] == pytest.approx(total.std().item())
    assert metrics["rewards/a/mean"] == pytest.approx(0.5)
    assert metrics["rewards/a/std"] == pytest.approx(torch.tensor([1.0, 0.0, 1.0, 0.0]).std().item())
    assert metrics["rewards/b/mean"] == pytest.approx(3.0)  # NaN (None) samples excluded
    assert metrics["rewards/b/std"] == pytest.approx(math.sqrt(2.0))


def test_reward_metrics_with_too_few_values_are_nan():
    metrics = reward_metrics(torch.tensor([[math.nan]]), torch.tensor([0.0]), [_reward("a", None)])
    assert metrics["reward"] == 0.0
    assert math.isnan(metrics["reward_std"])
    assert math.isnan(metrics["rewards/a/mean"]) and math.isnan(metrics["rewards/a/std"])
