"""Rollouts on the hf backend against the vllm backend: rollout seconds per step, generated tokens
per second, and the share of a whole online GRPO step that is rollout.

The model is big enough for decoding to matter on a CPU: a random-weight Llama of 41M parameters
(hidden 512, 12 layers, 8 heads of 64, MLP 1536, the byte-level vocabulary), LoRA r=16 on every
linear layer, fp32. A step is 2 prompts x G = 8 completions of up to 256 tokens (temperature 1,
so lengths vary: a random model ends a row with EOS at about 1/259 per token), dapo with beta 0,
backward, AdamW; the vllm backend then syncs the adapter into its engine before the next
rollout (`time/weight_sync`, part of the rollout time). Each backend runs in its own fresh
process (`WARMUP` step, then `STEPS` timed ones), from `OnlineTrainer.step`'s own timings.

    .venv-vllm/bin/pytest benchmarks/bench_rollout.py --benchmark-only   # appends to results/rollout-<device>.json
    .venv-vllm/bin/python benchmarks/bench_rollout.py                   # printed, nothing written

It needs vllm (README "Fast rollouts with vLLM"); without it only the hf backend runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WARMUP, STEPS = 1, 2
BACKENDS = ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
SHAPE = {"model_type": "llama", "vocab_size": 259, "hidden_size": 512, "intermediate_size": 1536,
         "num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 8,
         "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
PROMPTS = ["Once upon a time", "The quick brown fox", "In the beginning", "It was a dark night"]


def run(backend: str, warmup: int, steps: int) -> dict:
    from grpo_fast.config import config_from_dict
    from grpo_fast.online import OnlineTrainer

    with tempfile.TemporaryDirectory(prefix=f"bench-rollout-{backend}-") as out:
        (Path(out) / "model.json").write_text(json.dumps(SHAPE))
        (Path(out) / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "and then"}) + "\n" for p in PROMPTS))
        cfg = config_from_dict({
            "mode": "online", "model_path": str(Path(out) / "model.json"), "dtype": "float32",
            "dataset_path": str(Path(out) / "prompts.jsonl"), "output_dir": str(Path(out) / "run"),
            "batch_size": 2, "learning_rate": 1e-5, "seed": 0, "lora": {"r": 16, "alpha": 32},
            "online": {"generation_backend": backend, "num_generations": 8, "max_prompt_length": 16,
                       "max_completion_length": 256, "loss_type": "dapo", "beta": 0.0,
                       "log_completions_steps": 0, "rewards": [{"name": "grpo_fast.tasks:char_match"}]}})
        trainer = OnlineTrainer(cfg)
        rows = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            metrics, _ = trainer.step([trainer.prompts[j] for j in trainer.stream.take(cfg.batch_size)])
            metrics["time/step"] = time.perf_counter() - start
            if i >= warmup:
                rows.append(metrics)
        trainer.backend.close()
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("time/step", "time/rollout", "time/train")}
    tokens = sum(r["completions/mean_length"] * 16 for r in rows)
    rollout = sum(r["time/rollout"] for r in rows)
    return {"rollout_s": mean["time/rollout"], "train_s": mean["time/train"], "step_s": mean["time/step"],
            "rollout_share": rollout / sum(r["time/step"] for r in rows),
            "generated_tokens_per_s": tokens / rollout,
            "mean_completion_length": tokens / (16 * len(rows)),
            "weight_sync_s": sum(r.get("time/weight_sync", 0.0) for r in rows) / len(rows)}


def measure(backend: str, warmup: int = WARMUP, steps: int = STEPS) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", backend,
               "--warmup", str(warmup), "--steps", str(steps)]
    load = [round(x, 2) for x in os.getloadavg()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    return {"backend": backend, "load_avg_start": load, **result}


def _child(backend: str, warmup: int, steps: int) -> None:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    result = run(backend, warmup, steps)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if backend == "vllm":
        import vllm

        versions["vllm"] = vllm.__version__
    print(json.dumps({**result, "threads": torch.get_num_threads(), "warmup": warmup, "steps": steps,
                      "versions": versions}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollout(benchmark, record_result, device_name, backend):
    result = benchmark.pedantic(measure, args=(backend,), rounds=1, iterations=1)
    benchmark.extra_info.update({k: result[k] for k in ("rollout_s", "generated_tokens_per_s", "rollout_share")})
    record_result({"device_name": device_name, **result})
    assert result["generated_tokens_per_s"] > 0 and 0 < result["rollout_share"] < 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.warmup, args.steps)
        return
    for backend in BACKENDS:
        r = measure(backend, args.warmup, args.steps)
        print(f"{backend}: rollout {r['rollout_s']:.2f} s/step ({r['generated_tokens_per_s']:.0f} tokens/s, "
              f"mean completion {r['mean_completion_length']:.0f}), train {r['train_s']:.2f} s, step "
              f"{r['step_s']:.2f} s, rollout share {100 * r['rollout_share']:.0f}%, weight sync "
              f"{1e3 * r['weight_sync_s']:.1f} ms; load {r['load_avg_start']}")


if __name__ == "__main__":
    main()
