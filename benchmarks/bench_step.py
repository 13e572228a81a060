"""One full online GRPO step on CPU, grpo-fast against TRL's GRPOTrainer: step time and peak RSS.

A step is rollout (8 prompts x G = 8 sampled completions, at most 5 tokens) + rewards + loss +
backward + AdamW update, with the settings of configs/arithmetic-grpo.yaml for both systems:
the shipped tiny Llama warm-start examples/arithmetic/sft-30 (0.79M parameters, full fine-tuning),
its train.jsonl prompts, the `exact_match` reward (TRL gets the same function in its signature),
temperature 1.0, beta 0 (no reference model), loss_type dapo, lr 3e-5, seed 0, one torch thread.

Each system runs in its own fresh Python process, so neither inherits the other's allocations,
thread pools or imported modules, and its peak RSS is its own: `VmHWM` of /proc/self/status, the
high-water mark of the process's resident memory, which (unlike `ru_maxrss`) starts afresh at
exec. The child runs `WARMUP` steps (first-call costs: lazy imports, allocator growth), then
times `STEPS` steps one by one: grpo-fast's `OnlineTrainer.step` on the next 8 prompts of its
stream; TRL's training loop, timed between consecutive `on_step_end` callbacks (so its data
loading counts too). Both sample, so the completions, and thus their lengths, differ between the
systems; the mean completion length of the timed steps is recorded next to the times.

    pytest benchmarks/bench_step.py --benchmark-only      # appends to results/step-cpu.json
    python benchmarks/bench_step.py [--steps 20]          # both systems, printed, nothing written

Under pytest, pytest-benchmark times each child process once (start-up and model loading
included); the per-step figures are the child's own and go to `extra_info` and the results file.
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
CONFIG = ROOT / "configs" / "arithmetic-grpo.yaml"
SFT = ROOT / "examples" / "arithmetic" / "sft-30"
WARMUP, STEPS = 2, 20
SYSTEMS = ["grpo-fast"] + (["trl"] if importlib.util.find_spec("trl") else [])


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since exec) of this process, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def grpo_config(output_dir: str):
    from grpo_fast.config import load_config

    return load_config(str(CONFIG), [f"output_dir={output_dir}", f"model_path={SFT}",
                                     f"dataset_path={SFT / 'train.jsonl'}",
                                     f"eval_dataset_path={SFT / 'eval.jsonl'}",
                                     "online.eval_steps=0", "logging_steps=1000"])


def run_grpo_fast(warmup: int, steps: int) -> dict:
    from grpo_fast.online import OnlineTrainer

    with tempfile.TemporaryDirectory(prefix="bench-step-grpo-fast-") as out:
        cfg = grpo_config(out)
        trainer = OnlineTrainer(cfg)
        rss_setup = rss_kib("VmRSS")
        times, lengths = [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            records = [trainer.prompts[j] for j in trainer.stream.take(cfg.batch_size)]
            metrics, _ = trainer.step(records)
            if i >= warmup:
                times.append(time.perf_counter() - start)
                lengths.append(metrics["completions/mean_length"])
    return {"step_times_s": times, "mean_completion_length": sum(lengths) / len(lengths),
            "rss_after_setup_kib": rss_setup}


def trl_exact_match(eos_id: int):
    """grpo-fast's exact_match in TRL's reward signature. TRL passes each completion's ids up to
    and including EOS as `completion_ids`: a completion terminated iff its last id is EOS."""

    def exact_match(prompts, completions, completion_ids, answer, **kwargs):
        return [1.0 if ids and ids[-1] == eos_id and text.strip() == str(ref).strip() else 0.0
                for text, ids, ref in zip(completions, completion_ids, answer, strict=True)]

    return exact_match


def run_trl(warmup: int, steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    with tempfile.TemporaryDirectory(prefix="bench-step-trl-") as out:
        cfg = grpo_config(out)
        o = cfg.online
        model = AutoModelForCausalLM.from_pretrained(str(SFT))
        tokenizer = AutoTokenizer.from_pretrained(str(SFT))
        rows = [json.loads(line) for line in (SFT / "train.jsonl").read_text().splitlines()]
        args = GRPOConfig(
            output_dir=out, learning_rate=cfg.learning_rate, lr_scheduler_type="constant",
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            num_generations=o.num_generations,
            # TRL's batch counts completions: 8 prompts x G = 8 per optimizer step.
            per_device_train_batch_size=cfg.batch_size * o.num_generations,
            gradient_accumulation_steps=1, max_completion_length=o.max_completion_length,
            temperature=o.temperature, top_p=1.0, top_k=0, beta=o.beta, loss_type=o.loss_type,
            epsilon=o.epsilon_low, scale_rewards=o.scale_rewards, num_iterations=o.num_iterations,
            use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no",
            max_steps=warmup + steps, seed=cfg.seed, disable_tqdm=True)

        class StepClock(TrainerCallback):
            def __init__(self):
                self.ends, self.lengths = [], []

            def on_train_begin(self, args, state, control, **kwargs):
                self.ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                self.ends.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "completions/mean_length" in logs and state.global_step > warmup:
                    self.lengths.append(logs["completions/mean_length"])

        clock = StepClock()
        trainer = GRPOTrainer(model=model, reward_funcs=trl_exact_match(tokenizer.eos_token_id),
                              args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, callbacks=[clock])
        rss_setup = rss_kib("VmRSS")
        trainer.train()
    times = [b - a for a, b in zip(clock.ends, clock.ends[1:])][warmup:]
    return {"step_times_s": times, "mean_completion_length": sum(clock.lengths) / len(clock.lengths),
            "rss_after_setup_kib": rss_setup}


RUNNERS = {"grpo-fast": run_grpo_fast, "trl": run_trl}


def measure(system: str, warmup: int = WARMUP, steps: int = STEPS) -> dict:
    """Runs `system` in a fresh child process; its step times, peak RSS and versions."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", system,
               "--warmup", str(warmup), "--steps", str(steps)]
    load = [round(x, 2) for x in os.getloadavg()]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{system} child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    times = sorted(result["step_times_s"])
    return {"system": system, "load_avg_start": load,
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "mean_step_s": sum(times) / len(times), "median_step_s": times[len(times) // 2],
            "min_step_s": times[0], **result}


def _child(system: str, warmup: int, steps: int) -> None:
    import torch
    import transformers

    # A 128-wide model gains nothing from intra-op threads; on a busy machine they spin-wait.
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    result = RUNNERS[system](warmup, steps)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if system == "trl":
        import trl

        versions["trl"] = trl.__version__
    print(json.dumps({**result, "peak_rss_kib": rss_kib("VmHWM"), "warmup": warmup,
                      "steps": steps, "versions": versions}))


@pytest.mark.parametrize("system", SYSTEMS)
def test_grpo_step(benchmark, record_result, device_name, system):
    """One system (TRL only when installed) in its own process, timed once as a whole."""
    result = benchmark.pedantic(measure, args=(system,), rounds=1, iterations=1)
    benchmark.extra_info.update({k: result[k] for k in ("mean_step_s", "median_step_s", "min_step_s",
                                                        "peak_rss_kib", "load_avg_start")})
    record_result({"device_name": device_name, **result})
    assert len(result["step_times_s"]) == STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.warmup, args.steps)
        return
    for system in SYSTEMS:
        r = measure(system, args.warmup, args.steps)
        print(f"{system}: mean {r['mean_step_s'] * 1e3:.1f} ms/step, median "
              f"{r['median_step_s'] * 1e3:.1f} ms, min {r['min_step_s'] * 1e3:.1f} ms; peak RSS "
              f"{r['peak_rss_kib'] / 1024:.0f} MiB (after setup {r['rss_after_setup_kib'] / 1024:.0f} MiB); "
              f"mean completion {r['mean_completion_length']:.2f} tokens; load {r['load_avg_start']}")


if __name__ == "__main__":
    main()
