"""End to end on a tiny random-weight model: offline training writes checkpoints, resumes,
saves the adapter; eval runs; the log-prob backends give the same loss and gradients."""

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerState

from grpo_fast.cli import main
from grpo_fast.config import ConfigError, config_from_dict
from grpo_fast.data import GroupCollator, load_offline_dataset
from grpo_fast.modeling import load_model_and_tokenizer
from grpo_fast.cli import train
from grpo_fast.offline import OfflineGRPOTrainer

TINY = {
    "mode": "offline",
    "model_path": "configs/models/tiny-llama.json",
    "dataset_path": "data/arithmetic_train.jsonl",
    "eval_dataset_path": "data/arithmetic_eval.jsonl",
    "max_seq_length": 24,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "save_steps": 2,
    "save_total_limit": 2,
    "seed": 0,
    "lora": {"r": 4, "alpha": 8},
}


def head(path, n, tmp_path):
    """The first n records of a shipped data file, so tokenizing and eval stay fast."""
    out = tmp_path / Path(path).name
    out.write_text("".join(Path(path).read_text().splitlines(keepends=True)[:n]))
    return str(out)


def tiny_cfg(tmp_path, **extra):
    data = {"dataset_path": head(TINY["dataset_path"], 64, tmp_path),
            "eval_dataset_path": head(TINY["eval_dataset_path"], 40, tmp_path)}
    return config_from_dict({**TINY, **data, "output_dir": str(tmp_path / "run"), **extra})


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_train_checkpoint_resume_adapter_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_cfg(tmp_path, max_steps=4))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "grpo_config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "base_model" / "config.json").is_file()
    rows = read_metrics(out)
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for key in ("loss", "kl", "entropy", "learning_rate", "pairwise_accuracy", "top1_score"):
        assert all(key in r for r in logged), key

    # Another run into the same directory would rotate its checkpoints away: refused.
    with pytest.raises(ConfigError, match="already holds another run"):
        train(tiny_cfg(tmp_path, max_steps=6))
    # --resume continues from step 4 and keeps the two newest checkpoints.
    train(tiny_cfg(tmp_path, max_steps=6), resume=True)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    resumed = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert resumed[-2:] == [5, 6]

    cfg_path = tmp_path / "cfg.yaml"
    cfg = tiny_cfg(tmp_path)
    cfg_path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in
                                  {**TINY, "output_dir": str(out), "dataset_path": cfg.dataset_path,
                                   "eval_dataset_path": cfg.eval_dataset_path}.items()))
    assert main(["eval", "--config", str(cfg_path), "--adapter", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pairwise_accuracy" in printed and "base (adapter off)" in printed
    results = json.loads((out / "eval_results.json").read_text())["results"]
    assert set(results) == {"base (adapter off)", str(out)}
    for metrics in results.values():
        assert 0.0 <= metrics["pairwise_accuracy"] <= 1.0 and metrics["groups"] == 40


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="--resume: no complete checkpoint"):
        train(tiny_cfg(tmp_path, max_steps=1), resume=True)


def _loss_and_grads(cfg, backend):
    cfg.logprob_backend = backend
    model, tok = load_model_and_tokenizer(cfg)
    ds = load_offline_dataset(cfg.dataset_path, tok, cfg.max_seq_length)
    batch = GroupCollator(tok.pad_token_id)([ds[i] for i in range(3)])
    trainer = OfflineGRPOTrainer.__new__(OfflineGRPOTrainer)
    trainer.cfg = cfg
    trainer.state = TrainerState()
    trainer._init_metrics()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_trainer_loss_and_grads_match_naive_backend(tmp_path, backend):
    cfg = tiny_cfg(tmp_path, offline={"beta": 0.1, "length_normalize": True})
    ref_loss, ref_grads = _loss_and_grads(cfg, "naive")
    loss, grads = _loss_and_grads(cfg, backend)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
