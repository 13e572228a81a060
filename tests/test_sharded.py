"""Online GRPO sharded by FSDP2 and by DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (gloo;
DeepSpeed through its CPU accelerator), launched as a user launches it: `accelerate launch
--config_file configs/accelerate/<fsdp2|zero2|zero3>.yaml`.

* One step on fixed rollouts, every weight trained (the tied embedding / LM head included) and
  its log-probs from the Triton kernel (interpreted) reading the LM head that FSDP2 or ZeRO-3
  gathers: 2 sharded ranks with a prompt share each make the update one unsharded process makes
  with both shares, for each loss type's normalizer and both scale_rewards, under each strategy.
* A LoRA step the same way (frozen, sharded base; the adapter's shards trained).
* A short tiny-online run under each strategy: hf rollouts of different lengths on the two ranks (a rank that
  finishes decoding first keeps step with the other), each metrics row once, both ranks'
  completions, a whole model written once, and a run stopped at step 3 and resumed under 2
  ranks ending bit for bit where the straight run ends.
* hf rollouts of a sharded policy (FSDP2, ZeRO-3), gathered whole for the decoding (ds3_gather_for_generation)
  or decoded sharded with the ranks in step (each rank's prompts ending at different lengths),
  sample exactly what the whole model samples from the same seed.
* Offline's log-probs of a padded batch of groups (grpo_fast.logprobs.group_logprobs, the
  Triton kernel on the gathered LM head), policy and adapter-disabled reference, with the
  gradient of every weight: a sharded model gives what the whole one gives (whole offline runs
  under FSDP2 and ZeRO: tests/test_offline_ddp.py).
* QLoRA, a 4-bit base per rank, trains under ddp.yaml and zero2.yaml.
* What FSDP2 cannot run is refused in one line: a 4-bit base, FSDP1.

This file is also the launched child (`--child`), sharing test_online_ddp's configs and rollouts.

    pytest tests/test_sharded.py
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_online_ddp import (B, CASES, PROMPTS, TINY, UPDATE_RTOL, fixed_rollout, free_port, rel_err,  # noqa: E402
                             run_cfg, step_cfg)

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
FSDP2 = ACCELERATE / "fsdp2.yaml"


def one_step(out: Path, loss_type: str, scale: str, ga: int, records: list[dict], *, lora: bool = False,
             backend: str = "auto") -> tuple[list[torch.Tensor], dict]:
    """The trainer's whole weights after one step on `records` with fixed rollouts, and its metrics."""
    from grpo_fast.online import OnlineTrainer

    cfg = step_cfg(out, loss_type, scale, ga)
    cfg.lora.enabled = lora
    cfg.logprob_backend = backend
    trainer = OnlineTrainer(cfg)
    trainer.generate = lambda prompts: fixed_rollout(trainer.tokenizer, list(prompts))
    metrics, _ = trainer.step(records)
    whole = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in trainer.model.parameters()]
    return [p.detach().clone() for p in whole], metrics


def child(args) -> None:
    """Runs under accelerate launch: `step` saves rank 0's whole weights and metrics after each
    case's step; `run` trains (or resumes) tiny-online."""
    from grpo_fast import distributed
    from grpo_fast.online import OnlineTrainer

    torch.set_num_threads(1)
    out = Path(args.out)
    world = distributed.setup()
    assert world.strategy == args.strategy and world.size == 2, world
    if args.child == "decode":
        sharded_rollouts_match(out, world.rank, args.strategy)
        return
    if args.child == "offline":
        for lora in (False, True):
            offline_logps_match(out, lora)
        return
    if args.child == "step":
        records = [{"prompt": p, "answer": p[0] * 3} for p in PROMPTS]
        share = records[world.rank * 2 * B:(world.rank + 1) * 2 * B]          # 2 micro-batches of B per rank
        cases = [(*case, False) for case in CASES] + [("dapo", "batch", True)]
        for loss_type, scale, lora in cases:
            name = f"{loss_type}-{scale}{'-lora' if lora else ''}"
            weights, metrics = one_step(out / name, loss_type, scale, 2, share, lora=lora, backend="triton")
            if world.main:
                torch.save({"weights": weights, "metrics": metrics}, out / f"{name}.pt")
        return
    OnlineTrainer(run_cfg(out, args.steps), resume=args.resume).train()


def offline_logps_match(out: Path, lora: bool) -> None:
    """Sequence log-probs (policy and reference) and gradients of one offline batch from a model
    sharded by FSDP2 against the same model whole, in this process."""
    from grpo_fast import distributed
    from grpo_fast.logprobs import group_logprobs
    from grpo_fast.modeling import load_model_and_tokenizer

    cfg = step_cfg(out / f"offline-{lora}", "grpo", "group", 1)
    cfg.lora.enabled = lora
    gen = torch.Generator().manual_seed(1)
    B, K, T = 2, 3, 9
    batch = {"input_ids": torch.randint(3, 200, (B, K, T), generator=gen),
             "attention_mask": torch.ones(B, K, T, dtype=torch.long),
             "completion_mask": torch.zeros(B, K, T, dtype=torch.long),
             "group_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    batch["completion_mask"][..., 4:] = 1
    batch["attention_mask"][0, 1, -2:] = 0                         # a shorter completion
    batch["completion_mask"][0, 1, -2:] = 0
    upstream = torch.randn(B, K, generator=gen)
    results = []
    for sharded in (False, True):
        torch.manual_seed(0)
        model, _ = load_model_and_tokenizer(cfg, device=torch.device("cpu"))
        if sharded:
            distributed.shard(model)
        seq = group_logprobs(model, batch, backend="triton")                          # (B, K)
        (seq * upstream).sum().backward()
        ref = None
        if lora:
            with torch.no_grad(), model.disable_adapter():
                ref = group_logprobs(model, batch, backend="triton")
        grads = [distributed.local(p.grad) for p in model.parameters() if p.requires_grad]
        results.append((seq.detach(), ref, grads))
    (want, want_ref, want_grads), (got, got_ref, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if lora:
        torch.testing.assert_close(got_ref, want_ref, rtol=1e-5, atol=1e-5)
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def sharded_rollouts_match(out: Path, rank: int, strategy: str = "fsdp2") -> None:
    """Completions of this rank's prompts from the model whole, sharded and gathered, sharded and
    decoded sharded: the same tokens, for the same seed."""
    from grpo_fast import distributed
    from grpo_fast.modeling import load_model_and_tokenizer
    from grpo_fast.rollout.hf import generate_completions

    cfg = step_cfg(out / "decode", "grpo", "group", 1)
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(cfg, device=torch.device("cpu"))
    # Rank 1's prompts are sampled to end sooner than rank 0's (max 3 against 12 tokens).
    prompts, length = (["a=", "bb="], 12) if rank == 0 else (["c=", "dd=", "e="], 3)

    def sample(**kw):
        torch.manual_seed(1)
        return generate_completions(model, tokenizer, prompts, num_generations=4, max_prompt_length=8,
                                    max_completion_length=length, eos_ids=[tokenizer.eos_token_id], **kw).completion_ids
    whole = sample()
    if strategy == "fsdp2":
        distributed.shard(model)
    else:  # zero3: the parameters partitioned, gathered by hooks as each module runs
        model = distributed.zero_engine(cfg, model).module
        assert distributed.is_zero3(model)
    assert torch.equal(sample(gather=True), whole)
    assert torch.equal(sample(gather=False), whole)
    assert torch.equal(sample(gather=True, greedy=True)[::4], sample(gather=False, greedy=True)[::4])


def launch(tmp_path: Path, *args: str, config: Path = FSDP2, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run(["accelerate", "launch", "--config_file", str(config), "--num_processes", "2",
                           "--main_process_port", str(free_port()), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_two_sharded_ranks_make_the_update_one_process_makes(tmp_path, strategy):
    from grpo_fast.online import OnlineTrainer

    launch(tmp_path, __file__, "--child", "step", "--out", str(tmp_path / "fsdp"), "--strategy", strategy,
           config=ACCELERATE / f"{strategy}.yaml")
    records = [{"prompt": p, "answer": p[0] * 3} for p in PROMPTS]
    for loss_type, scale, lora in [(*case, False) for case in CASES] + [("dapo", "batch", True)]:
        cfg = step_cfg(tmp_path / f"start-{lora}", "grpo", "group", 4)
        cfg.lora.enabled = lora
        start = [p.detach().clone() for p in OnlineTrainer(cfg).model.parameters()]
        name = f"{loss_type}-{scale}{'-lora' if lora else ''}"
        want, metrics = one_step(tmp_path / f"one-{name}", loss_type, scale, 4, records, lora=lora,
                                 backend="triton")
        got = torch.load(tmp_path / "fsdp" / f"{name}.pt", weights_only=True)
        assert len(got["weights"]) == len(want)
        err = rel_err(got["weights"], want, start)
        # ZeRO updates an fp32 master partition of flattened groups: its gradients agree with one
        # process's to ~1e-6 (the norm below), and Adam's division by sqrt(v) magnifies the
        # rounding of the near-zero ones to ~1e-4 of the update (a wrong reduction: >= 5e-2).
        rtol = UPDATE_RTOL if strategy == "fsdp2" else 5 * UPDATE_RTOL
        assert err < rtol, f"{strategy} {name}: the sharded update differs from one process's by {err:.3g}"
        assert abs(got["metrics"]["grad_norm"] / metrics["grad_norm"] - 1) < 1e-5, (strategy, name)
        for key in ("reward", "reward_std", "completions/mean_length"):
            assert abs(got["metrics"][key] - metrics[key]) < 1e-6, (name, key)
        assert abs(got["metrics"]["loss"] - metrics["loss"]) < 1e-5 * max(1.0, abs(metrics["loss"])), name


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sharded_rollouts_sample_what_the_whole_model_samples(tmp_path, strategy):
    launch(tmp_path, __file__, "--child", "decode", "--out", str(tmp_path), "--strategy", strategy,
           config=ACCELERATE / f"{strategy}.yaml")


def test_offline_logps_and_gradients_of_a_sharded_model_are_the_whole_models(tmp_path):
    launch(tmp_path, __file__, "--child", "offline", "--out", str(tmp_path))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_a_sharded_run_logs_once_saves_whole_and_resumes_exactly(tmp_path, strategy):
    from safetensors.torch import load_file

    from grpo_fast.rundir import read_jsonl

    def run(out: Path, *args: str) -> None:
        launch(tmp_path, __file__, "--child", "run", "--out", str(out), "--strategy", strategy, *args,
               config=ACCELERATE / f"{strategy}.yaml")
    run(tmp_path / "straight", "--steps", "6")
    straight = tmp_path / "straight"
    rows = read_jsonl(straight / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [3, 6]
    completions = read_jsonl(straight / "completions.jsonl")
    assert len(completions) == 6 * 2 * 2 * 4, "each step: 2 ranks x 2 prompts x G = 4"
    assert len({r["prompt"] for r in completions if r["step"] == 1}) == 4, "the two ranks sampled different prompts"
    # The whole model, as one process writes it: every tensor at its full shape.
    final = load_file(straight / "model.safetensors")
    assert final["model.embed_tokens.weight"].shape == (259, 64)
    assert (straight / "checkpoint-6" / "rng_state-rank1.safetensors").is_file()

    resumed = tmp_path / "resumed"
    run(resumed, "--steps", "3")
    run(resumed, "--steps", "6", "--resume")
    assert digest(resumed / "model.safetensors") == digest(straight / "model.safetensors")
    assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl") if "loss" in r] == list(range(1, 7))


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_qlora_trains_replicated_and_under_zero2(tmp_path, tmp_path_factory, strategy):
    """A 4-bit base per rank, the adapter replicated (DDP) or its optimizer states partitioned
    (ZeRO-2): two steps, one adapter."""
    from test_qlora import save_base

    from grpo_fast.rundir import read_jsonl

    base = save_base(tmp_path_factory, TINY)
    launch(ROOT, "--no_python", "grpo-fast", "train", "--config", str(ROOT / "configs" / "tiny-online.yaml"),
           *[f"--set={kv}" for kv in (f"output_dir={tmp_path / 'run'}", f"model_path={base}", "max_steps=2",
                                      "logging_steps=1", "lora.enabled=true", "quantization.load_in_4bit=true",
                                      "quantization.compute_dtype=float32", "online.eval_steps=0")],
           config=ACCELERATE / f"{strategy}.yaml")
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_what_fsdp2_cannot_shard_is_refused_in_one_line(tmp_path):
    train = ["--no_python", "grpo-fast", "train", "--config", str(ROOT / "configs" / "tiny-online.yaml"),
             "--set", f"output_dir={tmp_path / 'run'}"]
    # The launcher exits 1 when a child fails; the child's own status is in its report.
    done = launch(ROOT, *train, "--set", "quantization.load_in_4bit=true", "--set", "lora.enabled=true", check=False)
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr
    assert "grpo-fast train: error: quantization.load_in_4bit: a bitsandbytes base cannot be sharded by FSDP2" \
        in done.stderr
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text(FSDP2.read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    done = launch(ROOT, *train, config=fsdp1, check=False)
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr
    assert "fsdp_version is 1: grpo-fast runs FSDP2" in done.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["step", "run", "offline", "decode"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--strategy", default="fsdp2")
    child(parser.parse_args())
    from grpo_fast.distributed import shutdown

    shutdown()
