"""Learning speed on CPU: held-out accuracy vs GRPO wall time, grpo-fast against TRL.

Both systems start from the shipped warm-start (examples/arithmetic/sft-30) with the settings of
configs/arithmetic-grpo.yaml: full fine-tuning, AdamW lr 3e-5 (constant), 8 prompts x G = 8
completions per step, max_completion_length 5, temperature 1.0, beta 0, loss_type dapo, the
config's `cpu_threads` torch threads for both (`--threads` overrides). TRL gets an equivalent
reward: its `completion_ids` keyword holds each completion up to and including EOS, so
"terminated" is "the last id is EOS", and the text is compared like grpo-fast's `exact_match`
(stripped completion == answer). Both are evaluated by the same function
(`grpo_fast.evaluate.greedy_eval`, greedy exact match on the 200 held-out prompts) every
`--eval-every` seconds of training time; the clock stops while evaluating, for both.

    python benchmarks/bench_learning.py [--minutes 8] [--trl-minutes M] [--eval-every 15] [--threads N] [--skip-trl]

`--trl-minutes` (default: --minutes) gives TRL a longer budget, so that its time to a target it
reaches later than grpo-fast is measured rather than bounded.

writes benchmarks/results/learning-cpu.json (both curves, steps/s, time to 0.80 and 0.90, machine,
load average, date) and benchmarks/results/learning-cpu.png. The systems run one after the other,
so each run's load average is recorded next to it. `pytest benchmarks/ --benchmark-only` runs a
short form, 10 steps of each, and puts their steps/s in pytest-benchmark's `extra_info` (not in
results/: learning-cpu.json is this script's full run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from grpo_fast.config import load_config
from grpo_fast.data import prompt_records
from grpo_fast.evaluate import greedy_eval
from grpo_fast.online import OnlineTrainer
from grpo_fast.rewards import load_reward_functions
from grpo_fast.rollout import eos_token_ids, make_backend

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "arithmetic-grpo.yaml"
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = (0.80, 0.90)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Evaluator:
    """grpo-fast's greedy exact-match evaluation on the held-out prompts, for any model."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.reward_fns = load_reward_functions([asdict(s) for s in cfg.online.rewards])

    def __call__(self, model, tokenizer) -> float:
        records = prompt_records(self.cfg, tokenizer, self.cfg.eval_dataset_path)[:self.cfg.online.eval_max_samples]
        backend = make_backend(self.cfg, model, tokenizer, eos_token_ids(model, tokenizer))
        return greedy_eval(backend, self.reward_fns, records)["accuracy"]


class Curve:
    """Training-time clock (paused while evaluating) and the accuracy curve it stamps."""

    def __init__(self, evaluate: Callable[[], float], eval_every: float, seconds: float,
                 max_steps: Optional[int] = None):
        self.evaluate, self.eval_every, self.seconds, self.max_steps = evaluate, eval_every, seconds, max_steps
        self.points: list[dict] = []
        self.train_time, self.steps, self._since = 0.0, 0, None

    def start(self) -> None:
        self.record()
        self._since = time.perf_counter()

    def after_step(self) -> bool:
        """Count a step; evaluate when due. Returns True when the time (or step) budget is spent."""
        self.train_time += time.perf_counter() - self._since
        self.steps += 1
        last = self.points[-1]["seconds"]
        done = self.train_time >= self.seconds or self.steps == self.max_steps
        if done or self.train_time - last >= self.eval_every:
            self.record()
        self._since = time.perf_counter()
        return done

    def record(self) -> None:
        self.points.append({"seconds": round(self.train_time, 2), "step": self.steps,
                            "accuracy": self.evaluate()})

    def summary(self) -> dict:
        def first(target: float) -> Optional[float]:
            return next((p["seconds"] for p in self.points if p["accuracy"] >= target), None)

        return {"steps": self.steps, "train_seconds": round(self.train_time, 2),
                "steps_per_second": round(self.steps / max(self.train_time, 1e-9), 3),
                "final_accuracy": self.points[-1]["accuracy"],
                **{f"seconds_to_{t:.2f}": first(t) for t in TARGETS}, "curve": self.points}


def run_grpo_fast(seconds: float, eval_every: float, max_steps: Optional[int] = None) -> dict:
    out = tempfile.mkdtemp(prefix="bench-learning-grpo-fast-")
    try:
        cfg = load_config(str(CONFIG), [f"output_dir={out}", "online.eval_steps=0", "max_steps=100000",
                                        f"model_path={ROOT / 'examples/arithmetic/sft-30'}",
                                        f"dataset_path={ROOT / 'examples/arithmetic/sft-30/train.jsonl'}",
                                        f"eval_dataset_path={ROOT / 'examples/arithmetic/sft-30/eval.jsonl'}"])
        evaluate = Evaluator(cfg)
        trainer = OnlineTrainer(cfg)
        curve = Curve(lambda: evaluate(trainer.model, trainer.tokenizer), eval_every, seconds, max_steps)
        load = load_avg()
        curve.start()
        while True:
            trainer.step([trainer.prompts[i] for i in trainer.stream.take(cfg.batch_size)])
            if curve.after_step():
                break
        return {"load_avg_start": load, "load_avg_end": load_avg(), **curve.summary()}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def trl_exact_match(eos_id: int):
    """grpo-fast's exact_match in TRL's reward signature: TRL passes each completion's ids up to
    and including EOS (`completion_ids`), so a completion terminated iff its last id is EOS."""

    def exact_match(prompts, completions, completion_ids, answer, **kwargs):
        return [1.0 if ids and ids[-1] == eos_id and text.strip() == str(ref).strip() else 0.0
                for text, ids, ref in zip(completions, completion_ids, answer, strict=True)]

    return exact_match


def run_trl(seconds: float, eval_every: float, max_steps: Optional[int] = None) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cfg = load_config(str(CONFIG), [f"eval_dataset_path={ROOT / 'examples/arithmetic/sft-30/eval.jsonl'}"])
    o = cfg.online
    model_dir = str(ROOT / "examples/arithmetic/sft-30")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (ROOT / "examples/arithmetic/sft-30/train.jsonl").read_text().splitlines()]
    evaluate = Evaluator(cfg)
    out = tempfile.mkdtemp(prefix="bench-learning-trl-")
    args = GRPOConfig(
        output_dir=out, learning_rate=cfg.learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm, num_generations=o.num_generations,
        # TRL's batch counts completions: 8 prompts x G = 8 per optimizer step.
        per_device_train_batch_size=cfg.batch_size * o.num_generations, gradient_accumulation_steps=1,
        max_completion_length=o.max_completion_length, temperature=o.temperature, top_p=1.0, top_k=0,
        beta=o.beta, loss_type=o.loss_type, epsilon=o.epsilon_low, scale_rewards=o.scale_rewards,
        num_iterations=o.num_iterations, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", max_steps=max_steps or 100000, seed=cfg.seed, disable_tqdm=True)

    class Clock(TrainerCallback):
        def __init__(self, trainer_ref):
            self.trainer_ref = trainer_ref
            self.curve = Curve(lambda: evaluate(trainer_ref[0].model, tokenizer), eval_every, seconds, max_steps)

        def on_train_begin(self, args, state, control, **kwargs):
            self.curve.start()

        def on_step_end(self, args, state, control, **kwargs):
            if self.curve.after_step():
                control.should_training_stop = True

    trainer_ref: list = []
    clock = Clock(trainer_ref)
    trainer = GRPOTrainer(model=model, reward_funcs=trl_exact_match(tokenizer.eos_token_id), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[clock])
    trainer_ref.append(trainer)
    load = load_avg()
    try:
        trainer.train()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"load_avg_start": load, "load_avg_end": load_avg(), **clock.curve.summary()}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in results["runs"].items():
        points = run["curve"]
        ax.plot([p["seconds"] for p in points], [p["accuracy"] for p in points], marker="o", ms=3,
                label=f"{name} ({run['steps_per_second']:.2f} steps/s, load {run['load_avg_start'][0]:.1f})")
    for target in TARGETS:
        ax.axhline(target, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("GRPO training wall time, s (evaluation excluded)")
    ax.set_ylabel("held-out greedy exact match (200 prompts)")
    threads = results["machine"]["torch_threads"]
    ax.set_title(f"Arithmetic GRPO from sft-30, lr 3e-5, {threads} torch thread{'s' if threads > 1 else ''}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_all(minutes: float, eval_every: float, skip_trl: bool, max_steps: Optional[int] = None,
            threads: Optional[int] = None, trl_minutes: Optional[float] = None) -> dict:
    torch.set_num_threads(threads or load_config(str(CONFIG)).cpu_threads or os.cpu_count())
    seconds = minutes * 60
    runs = {"grpo-fast": run_grpo_fast(seconds, eval_every, max_steps)}
    if not skip_trl:
        try:
            import trl
        except ImportError:
            trl = None
        if trl is not None:
            runs[f"TRL {trl.__version__} GRPOTrainer"] = run_trl((trl_minutes or minutes) * 60, eval_every, max_steps)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "minutes": minutes, "trl_minutes": trl_minutes or minutes,
            "eval_every_seconds": eval_every,
            "runs_load": {k: v["load_avg_start"] for k, v in runs.items()}, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="training wall time per system")
    parser.add_argument("--trl-minutes", type=float, default=None,
                        help="training wall time for TRL (default: --minutes)")
    parser.add_argument("--eval-every", type=float, default=15.0, help="seconds of training between evals")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both systems (default: the config's cpu_threads)")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    results = run_all(args.minutes, args.eval_every, args.skip_trl, threads=args.threads,
                      trl_minutes=args.trl_minutes)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "learning-cpu.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, RESULTS / "learning-cpu.png")
    for name, run in results["runs"].items():
        print(f"{name}: {run['steps']} steps in {run['train_seconds']} s ({run['steps_per_second']} steps/s), "
              f"final accuracy {run['final_accuracy']:.3f}, to 0.80: {run['seconds_to_0.80']} s, "
              f"to 0.90: {run['seconds_to_0.90']} s, load {run['load_avg_start']} -> {run['load_avg_end']}")
    print(f"wrote {RESULTS / 'learning-cpu.json'} and {RESULTS / 'learning-cpu.png'}")


def test_learning_steps_per_second(benchmark):
    """Short form: 10 steps of each system (one eval at start and end), steps/s side by side."""
    results = benchmark.pedantic(run_all, kwargs={"minutes": 60, "eval_every": 1e9, "skip_trl": False,
                                                  "max_steps": 10}, rounds=1, iterations=1)
    summary = {name: {k: run[k] for k in ("steps", "train_seconds", "steps_per_second", "load_avg_start")}
               for name, run in results["runs"].items()}
    benchmark.extra_info.update(summary)
    assert all(run["steps"] == 10 for run in summary.values())


if __name__ == "__main__":
    main()
