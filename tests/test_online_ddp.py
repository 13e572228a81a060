"""Online GRPO data-parallel under torchrun: 2 CPU processes (gloo) against one.

* One step on fixed rollouts: 2 ranks with a prompt share each make the update one process makes
  with both shares as two gradient-accumulation micro-batches, for each loss type's way of
  normalizing (per sequence, per micro-batch's tokens, constant, global token count) and for
  scale_rewards group and batch (the batch std is over both ranks' rewards). The logged reward is
  the whole step's.
* A short tiny-online run: each metrics row written once, both ranks' completions logged, the
  ranks' weights identical at the end, and a run stopped at step 3 and resumed under 2 ranks
  ending bit for bit where the straight run ends.

This file is also the torchrun child (`--child`), so parent and children share one definition of
the configs and rollouts.

    pytest tests/test_online_ddp.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "models" / "tiny-llama.json")
PROMPTS = ["a=", "bb=", "c=", "dd="]
G, B, C = 4, 1, 5
CASES = [("grpo", "group"), ("bnpo", "batch"), ("dr_grpo", "batch"), ("dapo", "batch"), ("dapo", "group")]
# Relative error of the update (see tests/test_wiring.py: rounding ~1e-6, a wrong reduction >= 5e-2).
UPDATE_RTOL = 1e-4


def step_cfg(out: Path, loss_type: str, scale: str, ga: int):
    from grpo_fast.config import config_from_dict

    data = out / "prompts.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"prompt": p, "answer": p[0] * 3}) + "\n" for p in PROMPTS))
    return config_from_dict({
        "mode": "online", "model_path": TINY, "attn_implementation": "sdpa", "dtype": "float32",
        "dataset_path": str(data), "output_dir": str(out / "run"), "seed": 0, "max_steps": 1,
        "batch_size": B, "gradient_accumulation_steps": ga, "learning_rate": 1e-2, "max_grad_norm": 0.0,
        "lora": {"enabled": False},
        "online": {"num_generations": G, "max_prompt_length": 8, "max_completion_length": C, "beta": 0.04,
                   "loss_type": loss_type, "scale_rewards": scale, "log_completions_steps": 0,
                   "rewards": [{"name": "grpo_fast.tasks:char_match"}]}})


def fixed_rollout(tokenizer, prompts: list[str]):
    """G completions of random letters per prompt, the same in every process (seeded by the
    prompts), lengths varying, some ending in EOS."""
    from grpo_fast.rollout import Rollout, completion_mask_after_eos, tokenize_prompts

    gen = torch.Generator().manual_seed(int(hashlib.sha256("".join(prompts).encode()).hexdigest()[:8], 16))
    prompt_ids, prompt_mask = tokenize_prompts(tokenizer, prompts, 8, torch.device("cpu"))
    ids = torch.randint(ord("a"), ord("e"), (len(prompts) * G, C), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 0.15] = tokenizer.eos_token_id
    mask, terminated = completion_mask_after_eos(ids, [tokenizer.eos_token_id])
    lengths = mask.sum(1)
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(ids.tolist(), lengths.tolist())]
    return Rollout(prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
                   completion_ids=ids, completion_mask=mask, texts=texts, terminated=terminated, lengths=lengths)


def one_step(out: Path, loss_type: str, scale: str, ga: int, records: list[dict]) -> tuple[list[torch.Tensor], dict]:
    """The trainer's weights after one step on `records` with fixed rollouts, and its metrics."""
    from grpo_fast.online import OnlineTrainer

    trainer = OnlineTrainer(step_cfg(out, loss_type, scale, ga))
    trainer.generate = lambda prompts: fixed_rollout(trainer.tokenizer, list(prompts))
    metrics, _ = trainer.step(records)
    return [p.detach().clone() for p in trainer.model.parameters()], metrics


def run_cfg(out: Path, steps: int):
    from grpo_fast.config import load_config

    return load_config(ROOT / "configs" / "tiny-online.yaml", [
        f"output_dir={out}", f"model_path={TINY}", f"dataset_path={ROOT / 'data' / 'repeat_letters.jsonl'}",
        f"eval_dataset_path={ROOT / 'data' / 'repeat_letters.jsonl'}", f"max_steps={steps}", "save_steps=3",
        "logging_steps=1", "online.log_completions_steps=1", "online.eval_steps=3", "batch_size=2",
        "online.num_generations=4"])


def child(args) -> None:
    """Runs under torchrun: `step` saves rank 0's weights and metrics after each case's step;
    `run` trains (or resumes) tiny-online and writes every rank's weight checksum."""
    from grpo_fast import distributed
    from grpo_fast.online import OnlineTrainer

    torch.set_num_threads(1)
    out = Path(args.out)
    world = distributed.setup()
    if args.child == "step":
        records = [{"prompt": p, "answer": p[0] * 3} for p in PROMPTS]
        share = records[world.rank * 2 * B:(world.rank + 1) * 2 * B]          # 2 micro-batches of B per rank
        for loss_type, scale in CASES:
            weights, metrics = one_step(out / f"{loss_type}-{scale}", loss_type, scale, 2, share)
            if world.main:
                torch.save({"weights": weights, "metrics": metrics}, out / f"{loss_type}-{scale}.pt")
        return
    trainer = OnlineTrainer(run_cfg(out, args.steps), resume=args.resume)
    trainer.train()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in trainer.model.parameters())).hexdigest()
    (out / f"weights-rank{world.rank}.sha256").write_text(digest)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    num = sum(float(((g - w) ** 2).sum()) for g, w in zip(got, want)) ** 0.5
    den = sum(float(((w - s) ** 2).sum()) for w, s in zip(want, start)) ** 0.5
    return num / den


def test_two_ranks_make_the_update_one_process_makes_with_both_shares(tmp_path):
    from grpo_fast.online import OnlineTrainer

    torchrun(tmp_path, "--child", "step", "--out", str(tmp_path / "ddp"))
    records = [{"prompt": p, "answer": p[0] * 3} for p in PROMPTS]
    start = [p.detach().clone() for p in OnlineTrainer(step_cfg(tmp_path / "start", "grpo", "group", 4)).model.parameters()]
    for loss_type, scale in CASES:
        want, metrics = one_step(tmp_path / f"one-{loss_type}-{scale}", loss_type, scale, 4, records)
        got = torch.load(tmp_path / "ddp" / f"{loss_type}-{scale}.pt", weights_only=True)
        err = rel_err(got["weights"], want, start)
        assert err < UPDATE_RTOL, f"{loss_type}/{scale}: the 2-rank update differs from one process's by {err:.3g}"
        # Adam's update hides a gradient's scale: the norm does not (a dapo loss summed over
        # ranks where DDP averages it would halve it).
        assert abs(got["metrics"]["grad_norm"] / metrics["grad_norm"] - 1) < 1e-4, (loss_type, scale)
        for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length"):
            assert abs(got["metrics"][key] - metrics[key]) < 1e-6, (loss_type, scale, key)
        assert abs(got["metrics"]["loss"] - metrics["loss"]) < 1e-5 * max(1.0, abs(metrics["loss"]))


def test_a_two_rank_run_logs_once_and_resumes_exactly(tmp_path):
    from grpo_fast.rundir import read_jsonl

    torchrun(tmp_path, "--child", "run", "--out", str(tmp_path / "straight"), "--steps", "6")
    rows = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 7)), steps
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [3, 6]
    completions = read_jsonl(tmp_path / "straight" / "completions.jsonl")
    assert len(completions) == 6 * 2 * 2 * 4, "each step: 2 ranks x 2 prompts x G = 4"
    first = [r["prompt"] for r in completions if r["step"] == 1]
    assert len(set(first)) == 4, "the two ranks sampled different prompts"
    digests = {(tmp_path / "straight" / f"weights-rank{r}.sha256").read_text() for r in (0, 1)}
    assert len(digests) == 1, "the ranks' weights differ"
    assert (tmp_path / "straight" / "checkpoint-6" / "rng_state-rank1.safetensors").is_file()

    torchrun(tmp_path, "--child", "run", "--out", str(tmp_path / "resumed"), "--steps", "3")
    torchrun(tmp_path, "--child", "run", "--out", str(tmp_path / "resumed"), "--steps", "6", "--resume")
    assert (tmp_path / "resumed" / "weights-rank0.sha256").read_text() in digests
    assert [r["step"] for r in read_jsonl(tmp_path / "resumed" / "metrics.jsonl") if "loss" in r] == steps


def test_the_shipped_accelerate_config_runs_two_ranks(tmp_path):
    from grpo_fast.rundir import read_jsonl

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}
    done = subprocess.run(["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
                           "--main_process_port", str(free_port()), "--no_python", "grpo-fast", "train",
                           "--config", str(ROOT / "configs" / "tiny-online.yaml"), "--set", f"output_dir={tmp_path / 'run'}",
                           "--set", "max_steps=2", "--set", "online.log_completions_steps=1", "--set", "batch_size=2",
                           "--set", "online.eval_steps=0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    completions = read_jsonl(tmp_path / "run" / "completions.jsonl")
    assert len(completions) == 2 * 2 * 2 * 16, "2 steps x 2 ranks x 2 prompts x G = 16"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["step", "run"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--resume", action="store_true")
    child(parser.parse_args())
    from grpo_fast.distributed import shutdown

    shutdown()
