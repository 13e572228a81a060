"""Online GRPO end to end on a tiny random-weight Llama: rollouts, reference, mu > 1, gradient
accumulation, the training loop's metrics, checkpoints and --resume, reward errors, eval, plot.

    pytest tests/test_online.py
"""

import json
import math
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, GenerationConfig

from grpo_fast import logprobs, online, rewards
from grpo_fast.reward_models import load_reward_functions
from grpo_fast.config import ConfigError, config_from_dict
from grpo_fast.data import DataError
from grpo_fast.modeling import BASE_MODEL_DIR, load_base_model, load_model_and_tokenizer
from grpo_fast.data import PromptStream
from grpo_fast.evaluate import evaluate_online
from grpo_fast.online import OnlineTrainer, train_online
from grpo_fast.plot import plot_run
from grpo_fast.rollout import hf as rollout_module
from grpo_fast.rollout import Rollout, completion_mask_after_eos, tokenize_prompts
from grpo_fast.rollout.hf import filter_logits, generate_completions, sample_completions
from grpo_fast.tasks import char_match

TRAIN_FIELDS = [
    "loss", "reward", "reward_std", "rewards/char_match/mean", "rewards/char_match/std",
    "rewards/exact_match/mean", "rewards/exact_match/std", "completions/mean_length",
    "completions/min_length", "completions/max_length", "completions/clipped_ratio",
    "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl", "entropy",
    "frac_reward_zero_std", "learning_rate", "grad_norm", "time/rollout", "time/train", "step",
    "epoch", "time",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 64-wide model gains nothing from intra-op threads, and on a shared 2-core machine their
    spin-waiting slows it down many times over; restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{w}=", "answer": w}) + "\n"
                            for w in ("ab", "cd", "efg", "h")))
    return str(path)


def make_cfg(prompts_file, output_dir, **overrides):
    online_overrides = overrides.pop("online", {})
    data = {
        "mode": "online", "dataset_path": prompts_file, "eval_dataset_path": prompts_file,
        "output_dir": str(output_dir), "batch_size": 2, "max_steps": 2, "learning_rate": 1e-2,
        "logging_steps": 1, "save_steps": 1, "save_total_limit": 1, "seed": 0,
        "lora": {"r": 4, "alpha": 8},
        "online": {"num_generations": 4, "max_prompt_length": 8, "max_completion_length": 4,
                   "beta": 0.1, "log_completions_steps": 1, "eval_steps": 0,
                   "rewards": [{"name": "grpo_fast.tasks:char_match"},
                               {"name": "exact_match", "weight": 0.0}],
                   **online_overrides},
        **overrides,
    }
    return config_from_dict(data)


@pytest.fixture
def rank_reward(monkeypatch):
    """A reward that always differs within a group, so every advantage is non-zero."""
    monkeypatch.setitem(rewards.BUILTIN_REWARDS, "rank",
                        lambda prompts, completions, **kw: [float(i % 4) for i in range(len(completions))])
    return [{"name": "rank"}]


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained_run(prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = make_cfg(prompts_file, out, report_to="tensorboard", online={"eval_steps": 1})
    summary = train_online(cfg)
    return cfg, out, summary


@pytest.fixture(scope="module")
def tiny(prompts_file, tmp_path_factory):
    cfg = make_cfg(prompts_file, tmp_path_factory.mktemp("tiny"))
    return (cfg, *load_model_and_tokenizer(cfg))


# ------------------------------------------------------------------------------------------
# Rollouts
# ------------------------------------------------------------------------------------------


def test_rollout_shapes_left_padding_and_mode(tiny):
    cfg, model, tok = tiny
    model.train()
    roll = generate_completions(model, tok, ["a=", "abcdef="], num_generations=3,
                                max_prompt_length=5, max_completion_length=4)
    N, P = roll.prompt_ids.shape
    assert (N, P) == (6, 5) and roll.completion_ids.shape[0] == 6
    assert roll.completion_ids.shape[1] == int(roll.lengths.max()) <= 4
    # Left padding; the long prompt keeps its *last* 5 tokens; each prompt's G rows adjacent.
    assert roll.prompt_mask[0].tolist() == [0, 0, 0, 1, 1]
    assert roll.prompt_ids[0, -2:].tolist() == tok("a=")["input_ids"]
    assert roll.prompt_ids[3].tolist() == tok("abcdef=")["input_ids"][-5:]
    assert all(torch.equal(roll.prompt_ids[i], roll.prompt_ids[i // 3 * 3]) for i in range(6))
    assert torch.equal(roll.lengths, roll.completion_mask.sum(1)) and len(roll.texts) == 6
    # Positions count from each row's first real token, as generate numbers them.
    assert roll.position_ids[0, 3:5].tolist() == [0, 1]
    assert model.training, "generation must restore training mode"
    greedy = [generate_completions(model, tok, ["ab="], max_prompt_length=8, max_completion_length=4,
                                   greedy=True).completion_ids for _ in range(2)]
    assert torch.equal(*greedy)


def test_completion_mask_stops_after_first_eos(tiny, monkeypatch):
    cfg, model, tok = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids = torch.tensor([[97, eos, 98, eos], [97, 98, 99, 100], [eos, 97, 98, 99]])
    mask, terminated = completion_mask_after_eos(ids, [eos])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert terminated.tolist() == [True, False, True]

    # Through generate_completions: a row finished at EOS reads pad from then on and leaves the
    # decoding batch, and decoding stops once every row has finished (before
    # max_completion_length). Each entry is one forward's next tokens, for the rows it runs.
    prompt = tok("x=")["input_ids"]
    rows = iter([[97], [eos, 98], [eos]])
    kept = []

    class Cache:
        def batch_repeat_interleave(self, repeats):
            pass

        def batch_select_indices(self, indices):
            kept.append(indices.tolist())

    def scripted(model, input_ids, *args):
        step = next(rows)
        assert input_ids.size(0) == len(step)   # the prompt pass runs once for the G rows
        logits = torch.full((len(step), model.config.vocab_size), -1e9)
        logits[range(len(step)), step] = 0.0
        return logits, Cache()

    monkeypatch.setattr(rollout_module, "_next_token_logits", scripted)
    roll = generate_completions(model, tok, ["x="], num_generations=2, max_prompt_length=8,
                                max_completion_length=6)
    assert roll.prompt_ids.tolist() == [prompt, prompt]
    assert roll.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert roll.completion_ids.tolist() == [[97, eos, pad], [97, 98, eos]]
    assert roll.texts == ["a", "ab"] and roll.terminated.tolist() == [True, True]
    assert roll.lengths.tolist() == [2, 3]
    assert kept == [[1]]      # row 0 left the batch after its EOS


@pytest.mark.parametrize("greedy, sampling", [
    (True, {}), (False, {"temperature": 1.0, "top_p": 1.0, "top_k": 0}),
    (False, {"temperature": 0.7, "top_p": 0.9, "top_k": 5}), (False, {"temperature": 0.8, "top_k": 0, "min_p": 0.2}),
    (False, {"temperature": 1.0, "top_k": 0, "repetition_penalty": 1.8}), (True, {"repetition_penalty": 1.8})],
    ids=["greedy", "plain", "filtered", "min_p", "repetition_penalty", "greedy-repetition_penalty"])
def test_sampler_matches_hf_generate(tiny, greedy, sampling):
    """The lean loop (one prompt pass shared by the G rows) decodes what `generate` decodes: the
    same greedy tokens, and the same samples from the same RNG state, on left-padded prompts,
    with every sampling setting (HF's processors and warpers, in HF's order)."""
    cfg, model, tok = tiny
    model.eval()
    prompt_ids, prompt_mask = tokenize_prompts(tok, ["ab=", "cdefg=", "h="], 8, torch.device("cpu"))
    G = 1 if greedy else 4
    eos = [tok.eos_token_id]
    settings = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, **sampling} if greedy else sampling
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=6, num_beams=1,
                              eos_token_id=eos, pad_token_id=tok.pad_token_id, **settings)
    torch.manual_seed(7)
    expected = model.generate(input_ids=prompt_ids.repeat_interleave(G, 0), attention_mask=prompt_mask.repeat_interleave(G, 0),
                              generation_config=config)[:, prompt_ids.size(1):]
    torch.manual_seed(7)
    got = sample_completions(model, prompt_ids, prompt_mask, num_generations=G, max_completion_length=6,
                             eos_ids=eos, pad_id=tok.pad_token_id, greedy=greedy, **sampling)
    assert torch.equal(got, expected[:, :got.size(1)]) and (expected[:, got.size(1):] == tok.pad_token_id).all()
    # (A sampled near-uniform tiny model draws the same tokens with or without a mild penalty;
    # greedy decoding shows it.)
    if "min_p" in sampling or (greedy and "repetition_penalty" in sampling):
        torch.manual_seed(7)
        plain = sample_completions(model, prompt_ids, prompt_mask, num_generations=G, max_completion_length=6,
                                   eos_ids=eos, pad_id=tok.pad_token_id, greedy=greedy,
                                   temperature=sampling.get("temperature", 1.0))
        assert not torch.equal(plain, got), "the setting changes what is sampled"


def test_filter_logits_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert filter_logits(logits, top_k=2).isinf().tolist() == [[False, False, True, True]]
    # top_p keeps the smallest set reaching p: 0.5 + 0.3 >= 0.75.
    assert filter_logits(logits, top_p=0.75).isinf().tolist() == [[False, False, True, True]]
    assert filter_logits(logits, top_p=0.01).isinf().tolist() == [[False, True, True, True]]
    torch.testing.assert_close(filter_logits(logits, temperature=0.5), logits * 2)


# ------------------------------------------------------------------------------------------
# Reference model
# ------------------------------------------------------------------------------------------


def test_adapter_disabled_reference_equals_base_model(prompts_file, tmp_path):
    cfg = make_cfg(prompts_file, tmp_path)
    model, tok = load_model_and_tokenizer(cfg, output_dir=str(tmp_path))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)      # a trained-looking adapter: policy != base
    roll = generate_completions(model, tok, ["ab=", "cdef="], num_generations=2,
                                max_prompt_length=8, max_completion_length=4)
    ref = logprobs.reference_logps(model, None, roll)
    base, _ = load_base_model(cfg, base_dir=str(tmp_path / BASE_MODEL_DIR))
    with torch.no_grad():
        expected, _ = logprobs.completion_logps(base, roll)
        policy, _ = logprobs.completion_logps(model, roll)
    mask = roll.completion_mask.bool()
    torch.testing.assert_close(ref[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert (policy - ref)[mask].abs().max() > 1e-3
    assert (ref[~mask] == 0).all()


def test_full_finetuning_reference_is_frozen_start(prompts_file, tmp_path):
    cfg = make_cfg(prompts_file, tmp_path, lora={"enabled": False})
    trainer = OnlineTrainer(cfg)
    assert trainer.ref_model is not None and not trainer.ref_model.training
    for p, q in zip(trainer.model.parameters(), trainer.ref_model.parameters(), strict=True):
        assert torch.equal(p, q) and not q.requires_grad
    no_ref = OnlineTrainer(make_cfg(prompts_file, tmp_path / "b", online={"beta": 0.0}))
    assert no_ref.ref_model is None


# ------------------------------------------------------------------------------------------
# The step: mu > 1, gradient accumulation
# ------------------------------------------------------------------------------------------


def test_num_iterations_uses_stored_old_logps(prompts_file, tmp_path, monkeypatch, rank_reward):
    calls = []

    def spy(logps, old_logps, ref_logps, advantages, mask, **kw):
        calls.append((logps.detach().clone(), old_logps, mask.bool()))
        return real(logps, old_logps, ref_logps, advantages, mask, **kw)

    real = online.grpo_loss
    monkeypatch.setattr(online, "grpo_loss", spy)
    cfg = make_cfg(prompts_file, tmp_path, online={"num_iterations": 2, "rewards": rank_reward})
    trainer = OnlineTrainer(cfg)
    metrics, _ = trainer.step([trainer.prompts[0], trainer.prompts[1]])
    (lp1, old1, mask), (lp2, old2, _) = calls
    assert old1 is not None and old2 is old1, "both passes must use the stored old log-probs"
    torch.testing.assert_close(lp1[mask], old1[mask], atol=1e-5, rtol=0)     # pass 1: ratio 1
    assert (lp2 - old2)[mask].abs().max() > 1e-4                             # pass 2: ratio != 1
    assert trainer.scheduler.last_epoch == 2, "one optimizer update per pass"

    calls.clear()
    OnlineTrainer(make_cfg(prompts_file, tmp_path / "mu1")).step([trainer.prompts[0]] * 2)
    assert [c[1] for c in calls] == [None], "mu = 1 runs no old-log-prob pass"


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_gradient_accumulation_matches_one_big_batch(prompts_file, tmp_path, monkeypatch, loss_type,
                                                    rank_reward):
    """ga=2 x B=1 gives the gradient of ga=1 x B=2 on the same samples (bnpo is per micro-batch)."""
    grads = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def capture(params, max_norm):
        params = list(params)
        grads.append([p.grad.clone() for p in params])
        return real_clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    big = OnlineTrainer(make_cfg(prompts_file, tmp_path / "a",
                                 online={"loss_type": loss_type, "rewards": rank_reward}))
    records = big.prompts[:2]
    roll = big.generate([r["prompt"] for r in records])                 # (2*G, C)
    big.generate = lambda prompts: roll
    big.step(records)

    small = OnlineTrainer(make_cfg(prompts_file, tmp_path / "b", batch_size=1, gradient_accumulation_steps=2,
                                   online={"loss_type": loss_type, "rewards": rank_reward}))
    halves = iter([roll.select(torch.arange(0, 4)), roll.select(torch.arange(4, 8))])
    small.generate = lambda prompts: next(halves)
    small.step(records)
    assert any(g.abs().max() > 0 for g in grads[0])
    for g_big, g_small in zip(*grads, strict=True):
        torch.testing.assert_close(g_small, g_big, atol=1e-7, rtol=1e-4)


def test_zero_advantage_rows_are_skipped_with_the_same_gradient(prompts_file, tmp_path, monkeypatch):
    """dapo with beta = 0: the step trains only on rows of non-zero advantage, and its gradient is
    the full batch's (the skipped rows' tokens still count in the normalizer)."""
    monkeypatch.setitem(rewards.BUILTIN_REWARDS, "half",
                        lambda prompts, completions, **kw: [0.0] * 4 + [0.0, 1.0, 2.0, 3.0])
    cfg = make_cfg(prompts_file, tmp_path, online={"loss_type": "dapo", "beta": 0.0,
                                                   "rewards": [{"name": "half"}]})
    trainer = OnlineTrainer(cfg)
    records = trainer.prompts[:2]
    roll = trainer.generate([r["prompt"] for r in records])                   # (2*G, C)
    trainer.generate = lambda prompts: roll
    rows_seen, grads = [], []
    real_logps, real_clip = online.completion_logps, torch.nn.utils.clip_grad_norm_

    def spy_logps(model, r, **kw):
        rows_seen.append(r.completion_ids.size(0))
        return real_logps(model, r, **kw)

    def capture(params, max_norm):
        params = list(params)
        grads.append([p.grad.clone() for p in params])
        return real_clip(params, max_norm)

    monkeypatch.setattr(online, "completion_logps", spy_logps)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    expected_loss, _ = online.grpo_loss(
        real_logps(trainer.model, roll)[0], None, None,
        online.group_advantages(torch.tensor([0.0] * 4 + [0.0, 1.0, 2.0, 3.0]), 4), roll.completion_mask,
        loss_type="dapo", num_items_in_batch=int(roll.lengths.sum()))
    expected_loss.backward()
    expected = [p.grad.clone() for p in trainer.update.params]
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step(records)
    assert rows_seen == [4], "only the group with different rewards is trained on"
    for got, want in zip(grads[0], expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)


def test_informative_rows_keeps_one_row_of_an_all_zero_batch():
    roll = Rollout(prompt_ids=torch.zeros(3, 2, dtype=torch.long), prompt_mask=torch.ones(3, 2, dtype=torch.long),
                   completion_ids=torch.arange(3).unsqueeze(1), completion_mask=torch.ones(3, 1, dtype=torch.long),
                   texts=["a", "b", "c"], terminated=torch.ones(3, dtype=torch.bool), lengths=torch.ones(3, dtype=torch.long))
    kept, adv = online.informative_rows(roll, torch.tensor([0.0, 1.5, -1.5]))
    assert kept.texts == ["b", "c"] and adv.tolist() == [1.5, -1.5]
    kept, adv = online.informative_rows(roll, torch.zeros(3))
    assert kept.texts == ["a"] and adv.tolist() == [0.0]


# ------------------------------------------------------------------------------------------
# The loop: metrics, checkpoints, resume, errors, eval, plot
# ------------------------------------------------------------------------------------------


def test_two_step_run_writes_every_metric(trained_run):
    cfg, out, summary = trained_run
    rows = read_rows(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and [r["step"] for r in eval_rows] == [1, 2]
    for row in train_rows:
        missing = [k for k in TRAIN_FIELDS if k not in row]
        assert not missing, f"missing metrics {missing}"
        assert row["completions/max_length"] <= 4 and row["kl"] >= 0
    assert {"eval/accuracy", "eval/reward"} <= set(eval_rows[0])
    completions = read_rows(out / "completions.jsonl")
    assert len(completions) == 2 * 2 * 4 and set(completions[0]["rewards"]) == {"char_match", "exact_match"}
    assert list((out / "runs").glob("events.out.tfevents.*")), "TensorBoard events"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"], "save_total_limit=1"
    assert (out / "adapter_config.json").is_file() and (out / "grpo_config.yaml").is_file()
    assert summary["global_step"] == 2 and math.isfinite(summary["reward_last"])


def test_resume_continues_exactly_from_the_checkpoint(prompts_file, tmp_path):
    straight = tmp_path / "straight"
    train_online(make_cfg(prompts_file, straight, max_steps=3))
    resumed = tmp_path / "resumed"
    train_online(make_cfg(prompts_file, resumed, max_steps=2))
    with pytest.raises(ConfigError, match="--resume"):
        train_online(make_cfg(prompts_file, resumed, max_steps=3))
    summary = train_online(make_cfg(prompts_file, resumed, max_steps=3), resume=True)
    assert summary["global_step"] == 3
    rows_a, rows_b = read_rows(straight / "metrics.jsonl"), read_rows(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2, 3]
    for key in ("reward", "loss", "grad_norm", "epoch"):
        assert rows_b[2][key] == pytest.approx(rows_a[2][key], rel=1e-5), key


def test_raising_reward_stops_training_by_name(prompts_file, tmp_path, monkeypatch):
    calls = []

    def flaky(prompts, completions, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise ZeroDivisionError("bad sample")
        return [0.0] * len(completions)

    monkeypatch.setitem(rewards.BUILTIN_REWARDS, "flaky", flaky)
    cfg = make_cfg(prompts_file, tmp_path, online={"rewards": [{"name": "flaky"}]})
    with pytest.raises(RuntimeError, match="reward function 'flaky' failed.*bad sample"):
        train_online(cfg)
    assert (tmp_path / "checkpoint-1" / "adapter_config.json").is_file(), "step 1's checkpoint kept"


def test_evaluate_online_reports_base_and_adapter(trained_run):
    cfg, out, _ = trained_run
    results = evaluate_online(cfg, adapter=str(out))
    assert list(results) == ["base (adapter off)", str(out)]
    for metrics in results.values():
        assert {"accuracy", "reward", "rewards/char_match/mean", "completions/mean_length"} <= set(metrics)
        assert 0.0 <= metrics["rewards/char_match/mean"] <= 1.0


def test_plot_run(trained_run, tmp_path):
    _, out, _ = trained_run
    png = plot_run(str(out), output=str(tmp_path / "m.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        plot_run(str(tmp_path))
    with pytest.raises(DataError, match="no values for nope"):
        plot_run(str(out), metrics=["nope"])


# ------------------------------------------------------------------------------------------
# Small parts
# ------------------------------------------------------------------------------------------


def test_prompt_stream_epochs_and_position():
    stream = PromptStream(5, seed=3)
    first = stream.take(3) + stream.take(3)
    assert sorted(first[:5]) == list(range(5)) and stream.epoch == pytest.approx(6 / 5)
    again = PromptStream(5, seed=3, position=3)
    assert again.take(3) == first[3:]


def test_char_match():
    assert char_match([""] * 4, ["cab", "cab!", "dab", ""], answer=["cab"] * 4, width=16) == pytest.approx(
        [1.0, 0.75, (0.5 * 15 / 16 + 2) / 3, 0.0])
    # Invisible special tokens (pad) still take positions; a final EOS does not.
    ids = [[99, 97, 98, 256, 256], [99, 97, 98, 258]]
    assert char_match([""] * 2, ["cab", "cab"], answer=["cab"] * 2, completion_ids=ids,
                      terminated=[False, True]) == pytest.approx([0.6, 1.0])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_trains(prompts_file, tmp_path, rank_reward, precision):
    """Autocast forwards with fp32 master weights: a step runs, stays finite and moves weights."""
    cfg = make_cfg(prompts_file, tmp_path, mixed_precision=precision, online={"rewards": rank_reward})
    trainer = OnlineTrainer(cfg)
    before = [p.detach().clone() for p in trainer.update.params]
    metrics, _ = trainer.step(trainer.prompts[:2])
    assert all(p.dtype == torch.float32 for p in trainer.update.params)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.update.params))


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_sampler_drops_finished_rows_and_still_matches_hf_generate(greedy):
    """On the arithmetic warm-start, whose answers end in EOS after 2-4 tokens, rows leave the
    decoding batch as they finish; the tokens are still exactly generate's, greedy and sampled
    from the same seed (finished rows keep their place in the random stream)."""
    sft = Path(__file__).resolve().parents[1] / "examples" / "arithmetic" / "sft-30"
    model = AutoModelForCausalLM.from_pretrained(sft).eval()
    tok = AutoTokenizer.from_pretrained(sft)
    prompts = [f"{a}+{b}=" for a, b in [(3, 4), (45, 67), (99, 99), (12, 30), (8, 91), (50, 50)]]
    prompt_ids, prompt_mask = tokenize_prompts(tok, prompts, 8, torch.device("cpu"))
    G = 1 if greedy else 6
    eos = [tok.eos_token_id]
    config = GenerationConfig(do_sample=not greedy, max_new_tokens=5, num_beams=1, temperature=1.0,
                              top_k=0 if not greedy else 50, top_p=1.0, eos_token_id=eos,
                              pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    expected = model.generate(input_ids=prompt_ids.repeat_interleave(G, 0),
                              attention_mask=prompt_mask.repeat_interleave(G, 0),
                              generation_config=config)[:, prompt_ids.size(1):]
    kept = []
    real_select = DynamicCache.batch_select_indices
    with patch.object(DynamicCache, "batch_select_indices",
                      lambda self, indices: kept.append(len(indices)) or real_select(self, indices)):
        torch.manual_seed(3)
        got = sample_completions(model, prompt_ids, prompt_mask, num_generations=G, max_completion_length=5,
                                 eos_ids=eos, pad_id=tok.pad_token_id, greedy=greedy, temperature=1.0)
    assert kept and kept[-1] < len(prompts) * G       # the batch did shrink
    assert torch.equal(got, expected[:, :got.size(1)]) and (expected[:, got.size(1):] == tok.pad_token_id).all()


def test_num_generations_eval_samples_n_completions_per_prompt(prompts_file, tmp_path, monkeypatch):
    from grpo_fast.evaluate import greedy_eval
    from grpo_fast.rollout.hf import HFBackend

    seen = []
    monkeypatch.setitem(rewards.BUILTIN_REWARDS, "count",
                        lambda prompts, completions, **kw: seen.append(list(completions)) or [1.0] * len(completions))
    records = [{"prompt": "ab=", "raw_prompt": "ab="}, {"prompt": "cd=", "raw_prompt": "cd="}]
    for n, expected in ((None, 2), (3, 6)):
        cfg = make_cfg(prompts_file, tmp_path, online={"num_generations_eval": n, "rewards": [{"name": "count"}]})
        model, tok = load_model_and_tokenizer(cfg)
        backend = HFBackend(cfg, model, tok, [tok.eos_token_id])
        torch.manual_seed(0)
        metrics = greedy_eval(backend, load_reward_functions([{"name": "count"}]), records)
        assert len(seen[-1]) == expected and metrics["accuracy"] == 1.0
    assert len(set(seen[-1][:3])) > 1 or len(set(seen[-1][3:])) > 1, "n sampled, not n copies of the greedy one"
