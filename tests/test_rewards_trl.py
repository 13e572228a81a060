"""TRL (1.16) compatibility of grpo_fast.rewards: the calling convention, trl.rewards' own
functions run unchanged, async rewards, log_extra/log_metric, trainer_state, column mappings,
importing reward modules beside the config, and sequence-classification reward models."""

import asyncio
import functools
import json
import math
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from grpo_fast.rewards import (
    RewardFunction,
    RewardLogs,
    TrainerState,
    as_conversational,
    compute_rewards,
    reward_metrics,
)
from grpo_fast.config import RewardSpec
from grpo_fast.reward_models import load_reward_functions

TINY_LLAMA = Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama.json"


def _reward(name, fn, **kwargs):
    return RewardFunction(name=name, fn=fn, **kwargs)


def _score(fns, prompts, completions, columns, **kwargs):
    per_fn, _ = compute_rewards(fns, prompts, completions, columns, **kwargs)
    return per_fn.T.tolist()


# --------------------------------------------------------------------------------------------
# trl.rewards, unchanged
# --------------------------------------------------------------------------------------------


def _as_trl_calls(fn, prompts, completions, columns, trainer_state):
    """``fn``'s rewards (None as NaN) and log_extra columns when called exactly as TRL 1.16's
    GRPOTrainer._calculate_rewards calls it."""
    logged = defaultdict(list)
    reward_kwargs = {k: v for k, v in columns.items() if k != "completion_ids"}
    out = fn(prompts=prompts, completions=completions, completion_ids=columns["completion_ids"],
             **reward_kwargs, trainer_state=trainer_state,
             log_extra=lambda column, values: logged[column].extend(values),
             log_metric=lambda name, value: None)
    return [math.nan if r is None else r for r in out], dict(logged)


def test_trl_reward_functions_run_unchanged_on_conversational_data():
    pytest.importorskip("math_verify")
    import trl.rewards

    prompts = [[{"role": "user", "content": "What is 1/3 or 2?"}]] * 4
    completions = as_conversational([r"<think>easy</think> \boxed{\frac{1}{3}}", r"\boxed{\frac{1}{2}}",
                                     r"<think>a</think> so \boxed{2}", "<think>x"])
    columns = {"solution": [r"\frac{1}{3}", r"\frac{1}{3}", "2", "no answer"],
               "completion_ids": [[1] * 10, [1] * 50, [1] * 90, [1] * 120], "terminated": [True] * 4}
    fns = load_reward_functions([
        {"name": "trl.rewards:accuracy_reward"},
        {"name": "trl.rewards:think_format_reward"},
        {"name": "trl.rewards:get_soft_overlong_punishment", "factory": True,
         "kwargs": {"max_completion_len": 100, "soft_punish_cache": 20}},
        {"name": "trl.rewards:get_cosine_scaled_reward", "factory": True, "kwargs": {"max_len": 100}},
    ])
    # Metric names as TRL logs them: the function's (or the factory's returned object's) __name__.
    assert [f.name for f in fns] == ["accuracy_reward", "think_format_reward",
                                     "soft_overlong_punishment_reward", "cosine_scaled_reward"]
    state, logs = TrainerState(global_step=3, max_steps=10, epoch=0.5), RewardLogs()
    per_fn, _ = compute_rewards(fns, prompts, completions, columns, trainer_state=state, logs=logs)

    trl_fns = [trl.rewards.accuracy_reward, trl.rewards.think_format_reward,
               trl.rewards.get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20),
               trl.rewards.get_cosine_scaled_reward(max_len=100)]
    trl_logged = {}
    for i, trl_fn in enumerate(trl_fns):
        expected, logged = _as_trl_calls(trl_fn, prompts, completions, columns, state)
        torch.testing.assert_close(per_fn[:, i], torch.tensor(expected), equal_nan=True)
        trl_logged.update(logged)
    # Not vacuous: the batch exercises right, wrong, unparseable gold (None) and each length band.
    torch.testing.assert_close(per_fn[:, 0], torch.tensor([1.0, 0.0, 1.0, math.nan]), equal_nan=True)
    assert per_fn[:, 1].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert per_fn[:, 2].tolist() == [0.0, 0.0, -0.5, -1.0]
    # accuracy_reward's log_extra columns land in the logs, as TRL's completions table gets them.
    assert logs.extra == trl_logged
    assert logs.extra["solution"] == columns["solution"]
    assert list(reward_metrics(per_fn, per_fn.nansum(1), fns))[2:4] == [
        "rewards/accuracy_reward/mean", "rewards/accuracy_reward/std"]


# --------------------------------------------------------------------------------------------
# The calling convention
# --------------------------------------------------------------------------------------------


def test_every_trl_signature_form_is_called_with_keywords():
    def grpo_fast_style(prompts, completions, **kwargs):
        return [float(len(p)) for p in prompts]

    def quick_start(completions, **kwargs):  # TRL's quick-start reward
        return [-abs(3 - len(c)) for c in completions]

    def by_ids(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    def keyword_only(*, completions, answer, terminated, trainer_state, log_extra, log_metric, **kwargs):
        return [float(c == a and t) for c, a, t in zip(completions, answer, terminated)]

    fns = [_reward(f.__name__, f) for f in (grpo_fast_style, quick_start, by_ids, keyword_only)]
    columns = {"answer": ["ab", "xyz"], "completion_ids": [[1], [1, 2, 3, 4]], "terminated": [True, True]}
    assert _score(fns, ["p", "pq"], ["ab", "xyzw"], columns) == [
        [1.0, 2.0], [-1.0, -1.0], [1.0, 4.0], [1.0, 0.0]]


def test_trainer_state_is_passed():
    def schedule(completions, trainer_state, **kwargs):
        progress = trainer_state.global_step / trainer_state.max_steps
        return [progress + trainer_state.epoch] * len(completions)

    state = TrainerState(global_step=5, max_steps=20, epoch=2.0)
    assert _score([_reward("schedule", schedule)], ["p"], ["c"], {}, trainer_state=state) == [[2.25]]


def test_column_mapping_renames_a_dataset_column():
    fns = load_reward_functions([{"name": "math_answer", "columns": {"answer": "solution"}}])
    assert fns[0].columns == {"answer": "solution"}
    columns = {"solution": ["#### 4", "#### 5"], "completion_ids": [[1], [1]], "terminated": [True, True]}
    assert _score(fns, ["p", "q"], ["4", "4"], columns) == [[1.0, 0.0]]
    with pytest.raises(ValueError, match=r"'math_answer' reads dataset column 'solution' as 'answer', but the batch"):
        compute_rewards(fns, ["p"], ["4"], {"answer": ["4"]})


def test_column_mapping_specs_are_checked():
    with pytest.raises(ValueError, match=r"^online\.rewards\[0\] 'format': 'columns' cannot set 'completions'"):
        load_reward_functions([{"name": "format", "columns": {"completions": "text"}}])
    with pytest.raises(ValueError, match=r"'columns' must map keywords to dataset column names"):
        load_reward_functions([{"name": "format", "columns": {"answer": 3}}])


# --------------------------------------------------------------------------------------------
# async reward functions
# --------------------------------------------------------------------------------------------


async def _slow_length(completions, scale=1.0, **kwargs):
    await asyncio.sleep(0.2)
    return [scale * len(c) for c in completions]


class _SlowJudge:
    async def __call__(self, completions, **kwargs):
        await asyncio.sleep(0.2)
        return [1.0 if c == "ok" else 0.0 for c in completions]


def test_async_reward_functions_run_concurrently():
    fns = [_reward("slow_length", _slow_length),
           _reward("sync", lambda completions, **kw: [0.5] * len(completions)),
           _reward("scaled", functools.partial(_slow_length, scale=2.0)),
           _reward("judge", _SlowJudge())]
    start = time.perf_counter()
    rewards = _score(fns, ["p", "q"], ["ok", "bad"], {})
    elapsed = time.perf_counter() - start
    assert rewards == [[2.0, 3.0], [0.5, 0.5], [4.0, 6.0], [1.0, 0.0]]
    assert elapsed < 0.35, f"three 0.2 s async rewards took {elapsed:.2f} s: not concurrent"


def test_async_rewards_work_inside_a_running_loop_and_keep_their_loop():
    loops = []

    async def which_loop(completions, **kwargs):
        loops.append(asyncio.get_running_loop())
        return [0.0] * len(completions)

    async def caller():  # e.g. a notebook: the caller itself runs an event loop
        return _score([_reward("which_loop", which_loop)], ["p"], ["c"], {})

    assert asyncio.run(caller()) == [[0.0]]
    _score([_reward("which_loop", which_loop)], ["p"], ["c"], {})
    # One loop for every call, so clients a reward module binds to it keep working.
    assert loops[0] is loops[1]


def test_failing_async_reward_is_reported_by_name():
    async def broken(completions, **kwargs):
        raise KeyError("solution")

    fns = [_reward("slow_length", _slow_length), _reward("broken", broken)]
    with pytest.raises(RuntimeError, match="reward function 'broken' failed") as info:
        compute_rewards(fns, ["p"], ["c"], {})
    assert isinstance(info.value.__cause__, KeyError)


# --------------------------------------------------------------------------------------------
# log_extra and log_metric
# --------------------------------------------------------------------------------------------


def test_log_extra_and_log_metric_land_in_reward_logs():
    def judged(completions, log_extra, log_metric, **kwargs):
        log_extra("verdict", [f"len {len(c)}" for c in completions])
        log_metric("judge/calls", 1.0)
        log_metric("judge/latency", torch.tensor(0.25))
        return [0.0] * len(completions)

    async def noted(completions, log_extra, log_metric, **kwargs):
        if completions[0] == "first":
            log_extra("note", ["n"] * len(completions))
        log_metric("judge/calls", 3.0)
        return [0.0] * len(completions)

    fns = [_reward("judged", judged), _reward("noted", noted)]
    logs = RewardLogs()
    compute_rewards(fns, ["p", "q"], ["first", "xy"], {}, logs=logs)
    compute_rewards(fns, ["r"], ["abc"], {}, logs=logs)
    # Row-aligned over both calls: a column one call did not log is None for its rows.
    assert logs.extra == {"verdict": ["len 5", "len 2", "len 3"], "note": ["n", "n", None]}
    assert logs.num_rows == 3
    assert logs.metrics == {"judge/calls": [1.0, 3.0, 1.0, 3.0], "judge/latency": [0.25, 0.25]}
    assert logs.metric_means() == {"judge/calls": 2.0, "judge/latency": 0.25}


def test_bad_logs_are_errors_naming_the_function_and_leave_logs_untouched():
    def short_column(completions, log_extra, **kwargs):
        log_extra("verdict", ["only one"])
        return [0.0] * len(completions)

    def text_metric(completions, log_metric, **kwargs):
        log_metric("judge", "fast")
        return [0.0] * len(completions)

    logs = RewardLogs()
    with pytest.raises(ValueError, match=r"^reward function 'short_column' logged 1 values for column 'verdict', "
                                         r"expected 2 \(one per completion\)$"):
        compute_rewards([_reward("short_column", short_column)], ["p", "q"], ["a", "b"], {}, logs=logs)
    with pytest.raises(ValueError, match=r"^reward function 'text_metric' called log_metric\('judge', 'fast'\)"):
        compute_rewards([_reward("text_metric", text_metric)], ["p"], ["a"], {}, logs=logs)
    assert logs == RewardLogs()


# --------------------------------------------------------------------------------------------
# Loading: factories, reward modules beside the config
# --------------------------------------------------------------------------------------------


def test_factory_specs(tmp_path, monkeypatch):
    (tmp_path / "factory_rewards_mod.py").write_text(textwrap.dedent(
        """
        def make_bonus(value):
            def bonus(completions, **kwargs):
                return [value] * len(completions)
            return bonus

        def broken_factory(max_len):
            raise ValueError(f"max_len {max_len}\\nmust be positive")

        def not_a_factory():
            return 3
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    [fn] = load_reward_functions([{"name": "factory_rewards_mod:make_bonus", "factory": True,
                                   "kwargs": {"value": 3.0}}])
    assert fn.name == "bonus" and fn.kwargs == {"value": 3.0}
    assert _score([fn], ["p"], ["ab"], {}) == [[3.0]]

    def error(spec):
        with pytest.raises(ValueError) as info:
            load_reward_functions([spec])
        return str(info.value)

    assert error({"name": "factory_rewards_mod:broken_factory", "factory": True, "kwargs": {"max_len": -1}}) == (
        "online.rewards[0] 'factory_rewards_mod:broken_factory': factory raised ValueError: max_len -1 must be "
        "positive")
    assert error({"name": "factory_rewards_mod:not_a_factory", "factory": True}) == (
        "online.rewards[0] 'factory_rewards_mod:not_a_factory': factory returned a int, not a reward function")
    assert error({"name": "length", "factory": True}).startswith(
        "online.rewards[0] 'length': 'factory: true' needs an import path")
    assert error({"name": "factory_rewards_mod:make_bonus", "factory": "yes"}) == (
        "online.rewards[0] 'factory_rewards_mod:make_bonus': 'factory' must be true or false, got 'yes'")


def test_search_paths_import_a_module_beside_the_config(tmp_path):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "beside_config_rewards.py").write_text(textwrap.dedent(
        """
        import asyncio

        async def judge(prompts, completions, **kwargs):
            await asyncio.sleep(0)
            return [1.0 if c.endswith("!") else 0.0 for c in completions]
        """))
    spec = {"name": "beside_config_rewards:judge"}
    with pytest.raises(ValueError, match="cannot import module 'beside_config_rewards'.*ModuleNotFoundError"):
        load_reward_functions([spec])
    path_before = list(sys.path)
    try:
        [fn] = load_reward_functions([spec], search_paths=[config_dir, Path.cwd()])
        assert sys.path == path_before
        assert fn.name == "judge"
        assert _score([fn], ["p", "q"], ["yes!", "no"], {}) == [[1.0, 0.0]]
    finally:
        sys.modules.pop("beside_config_rewards", None)


def test_imported_rewards_are_named_as_trl_names_them(tmp_path, monkeypatch):
    (tmp_path / "named_rewards_mod.py").write_text(textwrap.dedent(
        """
        class Judge:
            def __call__(self, completions, **kwargs):
                return [0.0] * len(completions)

        def brevity(completions, **kwargs):
            return [0.0] * len(completions)

        judge = Judge()
        short = brevity
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    fns = load_reward_functions([{"name": "named_rewards_mod:judge"}, {"name": "named_rewards_mod:short"}])
    assert [f.name for f in fns] == ["Judge", "brevity"]


def test_rewards_without_a_model_do_not_import_transformers():
    code = ("import sys; from grpo_fast.reward_models import load_reward_functions as load; "
            "load([{'name': 'math_answer'}, {'name': 'length'}]); print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# Sequence-classification reward models
# --------------------------------------------------------------------------------------------

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A random-weight tiny LlamaForSequenceClassification (one label) saved with the byte
    tokenizer, which carries a chat template; returns (its directory, the model)."""
    from transformers import AutoConfig, LlamaForSequenceClassification

    from grpo_fast.modeling import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = AutoConfig.for_model(**json.loads(TINY_LLAMA.read_text()), num_labels=1,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("rm") / "tiny-rm"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def _first_logits(model, texts):
    """The model's first logit on each text alone: no padding, no special tokens added (the
    byte tokenizer's ids are the UTF-8 bytes)."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([list(t.encode())])).logits[0, 0].item() for t in texts]


def test_reward_model_scores_plain_prompt_plus_completion(reward_model_dir):
    path, model = reward_model_dir
    # As preflight passes it: the config's RewardSpec with every other key at its default.
    spec = asdict(RewardSpec(model=str(path), weight=0.5, kwargs={"batch_size": 2}))
    [fn] = load_reward_functions([spec], device="cpu")
    assert fn.name == "tiny-rm" and fn.weight == 0.5  # TRL's name: the model's basename
    prompts, completions = ["2+2=", "Say hi: ", "x"], ["4", "hello there!", "yz"]
    per_fn, total = compute_rewards([fn], prompts, completions, {})
    expected = _first_logits(model, [p + c for p, c in zip(prompts, completions)])
    torch.testing.assert_close(per_fn[:, 0], torch.tensor(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, 0.5 * torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert len(set(expected)) == 3


def test_reward_model_scores_conversations_through_the_chat_template(reward_model_dir):
    path, model = reward_model_dir
    [fn] = load_reward_functions([{"model": str(path) + "/", "name": "judge"}])
    assert fn.name == "judge"
    questions, answers = ["2+2?", "Name a colour."], ["4", "Blue, or perhaps green."]
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}] for q in questions]
    per_fn, _ = compute_rewards([fn], prompts, as_conversational(answers), {})
    rendered = [f"<|system|>Be brief.\n<|user|>{q}\n<|assistant|>{a}\n" for q, a in zip(questions, answers)]
    torch.testing.assert_close(per_fn[:, 0], torch.tensor(_first_logits(model, rendered)), rtol=1e-5, atol=1e-5)

    fn.fn.tokenizer.chat_template = None
    with pytest.raises(RuntimeError, match="'judge' failed.*need a chat template"):
        compute_rewards([fn], prompts, as_conversational(answers), {})


def test_reward_model_that_does_not_load_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "no-such-rm")
    with pytest.raises(ValueError) as info:
        load_reward_functions([{"model": missing}])
    message = str(info.value)
    assert message.startswith(f"online.rewards[0] {missing!r}: cannot load reward model {missing!r}: ")
    assert "\n" not in message
    with pytest.raises(ValueError, match="a 'model' reward takes no 'factory' or 'columns'"):
        load_reward_functions([{"model": missing, "columns": {"answer": "solution"}}])
