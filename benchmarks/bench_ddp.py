"""Online GRPO data-parallel scaling on CPU: step time and samples per second for 1 and 2 ranks,
replicated (DDP) and sharded (FSDP2, DeepSpeed ZeRO-2 and ZeRO-3).

Each rank runs with one torch thread on its own core: a random-weight Llama of 3.4M parameters
(hidden 256, 4 layers, 4 heads of 64, MLP 768, the byte-level vocabulary), full fine-tuning,
4 prompts per rank x G = 8 completions of up to 32 tokens, dapo, beta 0, the `char_match` reward.
A rank count runs under `torchrun --nproc_per_node R` in a fresh process group: `WARMUP` steps,
then `STEPS` timed ones on rank 0 (the step ends with DDP's all-reduce, so rank 0's time is the
step's). Samples per second count completions; scaling efficiency is samples/s at 2 ranks over
twice that at 1. FSDP2 and ZeRO run with the variables `accelerate launch --config_file
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
SHAPE = {"model_type": "llama", "vocab_size": 259, "hidden_size": 256, "intermediate_size": 768,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
PROMPTS_PER_RANK, G = 4, 8


def child(out: Path, warmup: int, steps: int) -> None:
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


# What `accelerate launch --config_file configs/accelerate/<strategy>.yaml` exports to its processes.
STRATEGY_ENV = {"ddp": {},
                "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"},
                "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
                "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}}


def measure(ranks: int, warmup: int = WARMUP, steps: int = STEPS, strategy: str = "ddp") -> dict:
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
                               out, "--warmup", str(warmup), "--steps", str(steps)],
                              cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} ranks failed:\n{done.stderr[-4000:]}")
    return {"strategy": strategy, "load_avg_start": load, **json.loads(next(line for line in reversed(done.stdout.splitlines())
                                                       if line.startswith("{")))}


@pytest.mark.parametrize("strategy,ranks", [("ddp", 1), ("ddp", 2), ("fsdp2", 2), ("zero2", 2), ("zero3", 2)])
def test_ddp_scaling(benchmark, record_result, device_name, strategy, ranks):
    result = benchmark.pedantic(measure, args=(ranks, WARMUP, STEPS, strategy), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    record_result({"device_name": device_name, **result})
    assert result["ranks"] == ranks and result["samples_per_s"] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.warmup, args.steps)
        return
    one = measure(1, args.warmup, args.steps)
    runs = [one] + [measure(2, args.warmup, args.steps, strategy) for strategy in ("ddp", "fsdp2", "zero2", "zero3")]
    for r in runs:
        print(f"{r['strategy']}, {r['ranks']} rank(s): {r['mean_step_s'] * 1e3:.0f} ms/step (min "
              f"{r['min_step_s'] * 1e3:.0f}; rollout {r['mean_rollout_s'] * 1e3:.0f}, train "
              f"{r['mean_train_s'] * 1e3:.0f}), {r['samples_per_s']:.1f} samples/s, scaling efficiency "
              f"{r['samples_per_s'] / (r['ranks'] * one['samples_per_s']):.2f}; load {r['load_avg_start']}")


if __name__ == "__main__":
    main()
