"""GRPO data-parallel scaling on CPU: step time and samples per second for 1 and 2 ranks, online
replicated (DDP) and sharded (FSDP2, DeepSpeed ZeRO-2 and ZeRO-3), and offline the same.

Each rank runs with one torch thread on its own core: a random-weight Llama of 3.4M parameters
(hidden 256, 4 layers, 4 heads of 64, MLP 768, the byte-level vocabulary), full fine-tuning.
Online: 4 prompts per rank x G = 8 completions of up to 32 tokens, dapo, beta 0, the
`char_match` reward. Offline: HF's Trainer on 16 groups of 6 scored completions per rank
(data/arithmetic_train.jsonl, max_seq_length 32), the listwise loss, beta 0; a step's time is the
gap between consecutive metrics.jsonl rows (logging_steps 1). A rank count runs under
`torchrun --nproc_per_node R` in a fresh process group: `WARMUP` steps, then `STEPS` timed ones
(`OFFLINE_STEPS_FACTOR` times as many offline)
on rank 0 (the step ends with the gradient reduction, so rank 0's time is the step's). Samples
per second count completions; scaling efficiency is samples/s at 2 ranks over twice that at 1.
FSDP2 and ZeRO run with the variables `accelerate launch --config_file
configs/accelerate/<fsdp2|zero2|zero3>.yaml` exports (their all-gathers and reduce-scatters are
the price of holding half the weights, gradients and optimizer states per rank).

    pytest benchmarks/bench_ddp.py --benchmark-only      # appends to results/ddp-<device>.json
    python benchmarks/bench_ddp.py                       # printed, nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WARMUP, STEPS = 2, 10
# An offline step is a fraction of an online one and is timed from millisecond log stamps, where
# 10 steps left run-to-run noise of 20%: it times three times as many.
OFFLINE_STEPS_FACTOR = 3
SHAPE = {"model_type": "llama", "vocab_size": 259, "hidden_size": 256, "intermediate_size": 768,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
PROMPTS_PER_RANK, G = 4, 8
GROUPS_PER_RANK, K = 16, 6  # data/arithmetic_train.jsonl has 6 completions per prompt


def child(out: Path, warmup: int, steps: int, mode: str) -> None:
    if mode == "offline":
        offline_child(out, warmup, steps)
        return
    import torch

    from grpo_fast.config import config_from_dict
    from grpo_fast.online import OnlineTrainer

    torch.set_num_threads(1)
    cfg = config_from_dict({
        "mode": "online", "model_path": str(out / "model.json"), "dtype": "float32",
        "dataset_path": str(ROOT / "data" / "repeat_letters.jsonl"), "output_dir": str(out / "run"),
        "batch_size": PROMPTS_PER_RANK, "learning_rate": 1e-4, "seed": 0, "lora": {"enabled": False},
        "online": {"num_generations": G, "max_prompt_length": 8, "max_completion_length": 32, "loss_type": "dapo",
                   "beta": 0.0, "log_completions_steps": 0, "rewards": [{"name": "grpo_fast.tasks:char_match",
                                                                         "kwargs": {"width": 8}}]}})
    trainer = OnlineTrainer(cfg)
    world = trainer.world
    times, rollout, train = [], [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        share = trainer.stream.take(PROMPTS_PER_RANK * world.size)
        metrics, _ = trainer.step([trainer.prompts[j] for j in
                                   share[world.rank * PROMPTS_PER_RANK:(world.rank + 1) * PROMPTS_PER_RANK]])
        if i >= warmup:
            times.append(time.perf_counter() - start)
            rollout.append(metrics["time/rollout"])
            train.append(metrics["time/train"])
    if world.main:
        mean = sum(times) / len(times)
        print(json.dumps({"ranks": world.size, "mean_step_s": mean, "min_step_s": min(times),
                          "mean_rollout_s": sum(rollout) / steps, "mean_train_s": sum(train) / steps,
                          "samples_per_s": world.size * PROMPTS_PER_RANK * G / mean, "steps": steps}))


def offline_child(out: Path, warmup: int, steps: int) -> None:
    import torch

    from grpo_fast.config import config_from_dict
    from grpo_fast.offline import train_offline
    from grpo_fast.rundir import read_jsonl

    torch.set_num_threads(1)
    cfg = config_from_dict({
        "mode": "offline", "model_path": str(out / "model.json"), "dtype": "float32",
        "dataset_path": str(ROOT / "data" / "arithmetic_train.jsonl"), "output_dir": str(out / "run"),
        "max_seq_length": 32, "batch_size": GROUPS_PER_RANK, "max_steps": warmup + steps, "learning_rate": 1e-4,
        "logging_steps": 1, "save_steps": 10_000, "seed": 0, "lora": {"enabled": False}, "offline": {"beta": 0.0}})
    train_offline(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        stamps = [row["time"] for row in read_jsonl(out / "run" / "metrics.jsonl")]
        times = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
        world = int(os.environ.get("WORLD_SIZE", "1"))
        mean = sum(times) / len(times)
        print(json.dumps({"ranks": world, "mean_step_s": mean, "min_step_s": min(times),
                          "samples_per_s": world * GROUPS_PER_RANK * K / mean, "steps": len(times)}))


# What `accelerate launch --config_file configs/accelerate/<strategy>.yaml` exports to its processes.
STRATEGY_ENV = {"ddp": {},
                "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"},
                "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
                "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}}


def measure(ranks: int, warmup: int = WARMUP, steps: int = STEPS, strategy: str = "ddp",
            mode: str = "online") -> dict:
    """One run's rank-0 timings: `steps` timed online steps, OFFLINE_STEPS_FACTOR times as many offline."""
    steps *= OFFLINE_STEPS_FACTOR if mode == "offline" else 1
    with tempfile.TemporaryDirectory(prefix=f"bench-ddp-{ranks}-") as out, socket.socket() as s:
        (Path(out) / "model.json").write_text(json.dumps(SHAPE))
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
               **STRATEGY_ENV[strategy]}
        load = [round(x, 2) for x in os.getloadavg()]
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, "--child",
                               out, "--warmup", str(warmup), "--steps", str(steps), "--mode", mode],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} ranks failed:\n{done.stderr[-4000:]}")
    return {"mode": mode, "strategy": strategy, "load_avg_start": load, **json.loads(next(line for line in reversed(done.stdout.splitlines())
                                                       if line.startswith("{")))}


CASES = [("online", "ddp", 1), ("online", "ddp", 2), ("online", "fsdp2", 2), ("online", "zero2", 2),
         ("online", "zero3", 2), ("offline", "ddp", 1), ("offline", "ddp", 2), ("offline", "fsdp2", 2),
         ("offline", "zero2", 2), ("offline", "zero3", 2)]


@pytest.mark.parametrize("mode,strategy,ranks", CASES)
def test_ddp_scaling(benchmark, record_result, device_name, mode, strategy, ranks):
    result = benchmark.pedantic(measure, args=(ranks, WARMUP, STEPS, strategy, mode), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    record_result({"device_name": device_name, **result})
    assert result["ranks"] == ranks and result["samples_per_s"] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="online", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.warmup, args.steps, args.mode)
        return
    one = {}
    for mode, strategy, ranks in CASES:
        r = measure(ranks, args.warmup, args.steps, strategy, mode)
        one.setdefault(mode, r)
        split = (f"; rollout {r['mean_rollout_s'] * 1e3:.0f}, train {r['mean_train_s'] * 1e3:.0f}"
                 if mode == "online" else "")
        print(f"{mode} {strategy}, {ranks} rank(s): {r['mean_step_s'] * 1e3:.0f} ms/step (min "
              f"{r['min_step_s'] * 1e3:.0f}{split}), {r['samples_per_s']:.1f} samples/s, scaling efficiency "
              f"{r['samples_per_s'] / (ranks * one[mode]['samples_per_s']):.2f}; load {r['load_avg_start']}")


if __name__ == "__main__":
    main()
