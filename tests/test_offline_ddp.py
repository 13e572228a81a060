"""Offline GRPO on 2 CPU processes (gloo) against one, launched as a user launches it:
data-parallel under torchrun (LoRA, and QLoRA with a 4-bit base per rank), sharded by FSDP2 under
`accelerate launch --config_file configs/accelerate/fsdp2.yaml` (grpo-fast shards the model
itself; HF's Trainer gets it sharded), and partitioned by DeepSpeed ZeRO-2 / ZeRO-3 under
zero2.yaml / zero3.yaml (HF's Trainer and accelerate, DeepSpeed's CPU accelerator; QLoRA too
under ZeRO-2), the LoRA adapter or every weight trained.

* 2 ranks at batch_size 2 train what one process trains at batch_size 4 (HF's sampler gives
  rank r the r-th of each pair of consecutive seeded batches, so both see the same global
  batches in the same order): the final weights agree to float rounding, and so do the logged
  loss, KL, entropy, top-1 score, reference KL (offline.beta > 0) and gradient norm. Under FSDP2
  and ZeRO-3 the log-probs come from the Triton kernel (interpreted) reading the LM head
  gathered from its shards, in both runs; a full fine-tune accumulates two micro-batches a step.
* The run directory is written once: one adapter (or model, whole), the random base whole, one
  save, metrics.jsonl with each step once, one end-of-run summary, checkpoints holding both
  ranks' RNG states and the optimizer state (whole under FSDP2; every rank's partition in
  DeepSpeed's own checkpoint under ZeRO), no staging left over.
* A run resumed under 2 ranks from its step-2 checkpoint ends bit for bit where it ended; one
  killed before its final model was written writes it from its last checkpoint.

    pytest tests/test_offline_ddp.py
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from grpo_fast.cli import train
from grpo_fast.config import config_from_dict
from grpo_fast.modeling import load_model_and_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_online_ddp import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The console script beside this interpreter: run by torchrun as is (--no-python), so that no
# `python -m` puts a working directory holding kernels/ in front of HF's `kernels` package.
GRPO_FAST = str(Path(sys.executable).with_name("grpo-fast"))
ACCELERATE = ROOT / "configs" / "accelerate"
STEPS = 4
# Relative error of the update, ||ddp - single|| / ||single - init||: measured 4e-6 on this
# machine (float rounding: the all-reduce sums in another order); a reference that is the policy
# (the DDP wrapper asked for disable_adapter) gives 1.5e-2.
UPDATE_RTOL = 1e-4
LOGGED = ("loss", "kl", "entropy", "top1_score", "ref_kl", "grad_norm", "learning_rate", "epoch")


def config(tmp_path: Path) -> dict:
    data = tmp_path / "train.jsonl"
    data.write_text("".join((ROOT / "data" / "arithmetic_train.jsonl").read_text().splitlines(keepends=True)[:32]))
    return {"mode": "offline", "model_path": str(ROOT / "configs" / "models" / "tiny-llama.json"),
            "dataset_path": str(data), "max_seq_length": 24, "batch_size": 4, "max_steps": STEPS,
            "learning_rate": 1e-2, "logging_steps": 1, "save_steps": 2, "save_total_limit": 2,
            "seed": 0, "cpu_threads": 1, "lora": {"r": 4, "alpha": 8},
            "offline": {"beta": 0.1, "score_temperature": 0.25}}


def launch(launcher: str, cfg: dict, tmp_path: Path, *extra: str) -> str:
    """`grpo-fast train` on 2 CPU ranks at half the config's batch_size, under torchrun or
    accelerate launch with a shipped file (fsdp2, zero2, zero3); its stdout + stderr."""
    path = tmp_path / "ranks.yaml"
    path.write_text(json.dumps({**cfg, "batch_size": cfg["batch_size"] // 2}))  # JSON is YAML
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                   str(ACCELERATE / f"{launcher}.yaml"), "--num_processes", "2", "--main_process_port", str(free_port())]
    done = subprocess.run([*command, "--no-python" if launcher == "torchrun" else "--no_python", GRPO_FAST,
                           "train", "--config", str(path), *extra],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The run's final adapter, or its whole model."""
    adapter = run / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else run / "model.safetensors"))


def start_weights(cfg: dict) -> dict[str, torch.Tensor]:
    model = load_model_and_tokenizer(config_from_dict(cfg))[0]
    return get_peft_model_state_dict(model) if cfg["lora"]["enabled"] else dict(model.state_dict())


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rel_err(got: dict, want: dict, start: dict) -> float:
    num = sum(float(((got[k] - want[k]) ** 2).sum()) for k in want) ** 0.5
    den = sum(float(((want[k] - start[k]) ** 2).sum()) for k in want) ** 0.5
    return num / den


# (launcher, weights trained, base): a random base built from the config file, or one saved as a
# pretrained checkpoint (which ZeRO-3 loads partitioned; a 4-bit base is quantized as it loads).
CASES = [("torchrun", "lora", "config"), ("torchrun", "qlora", "saved"), ("fsdp2", "lora", "config"),
         ("fsdp2", "full", "config"), ("zero2", "full", "config"), ("zero2", "qlora", "saved"),
         ("zero3", "lora", "config"), ("zero3", "full", "saved")]


@pytest.mark.parametrize("launcher,weights_trained,base", CASES,
                         ids=[f"{'ddp' if a == 'torchrun' else a}-{b}" for a, b, _ in CASES])
def test_two_ranks_train_what_one_process_trains_at_twice_the_batch_and_write_once(tmp_path, tmp_path_factory,
                                                                                    launcher, weights_trained, base):
    cfg = config(tmp_path)
    lora = weights_trained != "full"
    cfg["lora"]["enabled"] = lora
    if base == "saved":
        from test_qlora import save_base

        cfg["model_path"] = save_base(tmp_path_factory, cfg["model_path"])
    if weights_trained == "qlora":
        cfg["quantization"] = {"load_in_4bit": True, "compute_dtype": "float32"}
    if launcher in ("fsdp2", "zero3"):
        cfg["logprob_backend"] = "triton"  # the kernel on the LM head gathered from its shards
    if not lora:
        cfg["offline"]["beta"] = 0.0  # the offline reference needs an adapter to switch off
        # Two micro-batches a step: FSDP2 reduce-scatters each one's gradients (HF would defer).
        cfg["gradient_accumulation_steps"] = 2
    ranks, single = tmp_path / "ranks", tmp_path / "single"
    log = launch(launcher, {**cfg, "output_dir": str(ranks)}, tmp_path)
    train(config_from_dict({**cfg, "output_dir": str(single)}))

    got_weights, want_weights = weights(ranks), weights(single)
    assert got_weights.keys() == want_weights.keys()
    assert all(got_weights[k].shape == w.shape for k, w in want_weights.items()), "written whole"
    assert rel_err(got_weights, want_weights, start_weights(cfg)) < UPDATE_RTOL

    got, want = rows(ranks), rows(single)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    if lora:
        assert all(r["ref_kl"] > 0 for r in want[1:])  # the reference is not the policy
    for g, w in zip(got, want):
        for key in LOGGED if lora else [k for k in LOGGED if k != "ref_kl"]:
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), (g["step"], key)

    # Written once, by the main process; everything the run logs, logged once.
    saved = "saved LoRA adapter" if lora else "saved model"
    assert log.count(saved) == 1 and log.count("train data: 32 groups") == 1
    assert log.count("'train_runtime'") == 1
    assert log.count("sharded over 2 processes") == (launcher == "fsdp2")
    dirs = ["base_model"] if lora and base == "config" else []
    assert sorted(p.name for p in ranks.iterdir() if p.is_dir()) == [*dirs, "checkpoint-2", "checkpoint-4"]
    if dirs:
        # The seeded random base, built whole (not inside ZeRO-3's partitioned init) and saved whole.
        base, want_base = (load_file(str(run / "base_model" / "model.safetensors")) for run in (ranks, single))
        assert base.keys() == want_base.keys() and all(torch.equal(base[k], w) for k, w in want_base.items())
    zero = launcher.startswith("zero")
    for ckpt in ("checkpoint-2", "checkpoint-4"):
        assert {"rng_state_0.pth", "rng_state_1.pth", "latest" if zero else "optimizer.pt", "scheduler.pt"} <= {
            p.name for p in (ranks / ckpt).iterdir()}
    if zero:
        # DeepSpeed's own checkpoint: every rank's optimizer partition.
        assert len(list((ranks / "checkpoint-4" / "global_step4").glob("*_optim_states.pt"))) == 2
    else:
        optimizer = torch.load(ranks / "checkpoint-4" / "optimizer.pt", weights_only=True)
        moments = {tuple(s["exp_avg"].shape) for s in optimizer["state"].values()}
        assert moments == {tuple(w.shape) for w in want_weights.values()}, "whole optimizer states"

    # Resumed from step 2 under 2 ranks: rows 3 and 4 are written again, once, and it ends where it ended.
    final = weights(ranks)
    shutil.rmtree(ranks / "checkpoint-4")
    log = launch(launcher, {**cfg, "output_dir": str(ranks)}, tmp_path, "--resume")
    assert "resuming from" in log and "checkpoint-2 at step 2 of 4" in log
    assert [r["step"] for r in rows(ranks)] == list(range(1, STEPS + 1))
    assert all(torch.equal(final[k], t) for k, t in weights(ranks).items())

    if weights_trained == "full" and launcher != "zero2":
        # Killed after the last checkpoint, before the final model: --resume writes it from the
        # checkpoint's weights, read into the shards (FSDP2) or partitions (ZeRO-3) and gathered.
        for name in ("grpo_config.yaml", "model.safetensors"):
            (ranks / name).unlink()
        log = launch(launcher, {**cfg, "output_dir": str(ranks)}, tmp_path, "--resume")
        assert "already finished at step 4" in log
        assert all(torch.equal(final[k], t) for k, t in weights(ranks).items())
