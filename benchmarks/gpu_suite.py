"""GPU verification in one call: kernel correctness, log-prob benchmarks, roofline,
a full QLoRA GRPO step at the Qwen2.5-1.5B shape with the planner's estimate beside it (issue 5),
and offline training under the sharded accelerate configs (issue 14).

    python benchmarks/gpu_suite.py [--out benchmarks/results] [--parts kernels,bench,roofline,step,sharded]

Parts (each recorded, a failing one does not stop the others; the exit status is non-zero if
any failed):

- `kernels`: tests/test_kernels.py on the GPU (GRPO_FAST_TEST_CUDA=1, compiled Triton rather
  than the interpreter) as a subprocess, then the fused kernel at a real shape (N=4096 tokens,
  H=1536, V=151936, bf16) against the naive fp32 reference: max abs error of the log-probs,
  relative (Frobenius) error of the hidden and weight gradients under a random upstream grad.
- `bench`: `pytest benchmarks/bench_logprobs.py --benchmark-only` as a subprocess (it appends
  to results/logprobs-<gpu>.json itself).
- `roofline`: the card's bf16 GEMM throughput (best of square matmuls) and the fused kernel's
  forward + backward throughput with a trainable LM head at N=16384, H=1536, V=151936, counted
  as 6 N H V FLOPs (2 N H V for the logits, as much for each of the two gradients; the kernel's
  recomputation of the logits in its backward is not counted, as in MFU), and its fraction of
  the GEMM figure.
- `step`: a randomly initialised model with the shape of configs/models/qwen2.5-1.5b.json (bf16
  weights saved to a temporary directory with the byte-level tokenizer; no internet needed),
  loaded through grpo-fast as configs/qwen2.5-1.5b-gsm8k-qlora.yaml sets it up (4-bit NF4 with
  double quantization, LoRA r=16 on all linear layers, gradient checkpointing, paged 8-bit
  AdamW, FlashAttention-2 when flash_attn imports, else SDPA), then `OnlineTrainer.step` on one
  prompt of 256 random-letter tokens x G=8 completions of exactly 512 tokens. Random weights
  would emit EOS at random, so the trainer's EOS set is replaced by an id outside the vocabulary
  (never sampled). The reward is the share of digits in the completion: random text makes it
  differ between completions, so every row has a non-zero advantage and is trained on (a
  constant reward would leave one row of eight in the backward). Reports peak
  `torch.cuda.max_memory_allocated` over two steps (the optimizer states exist from the first),
  rollout and training tokens/s, the planner's `estimate(cfg, shape).allocated` and its relative
  error, and packed-vs-padded log-probs of the same model on an unevenly padded batch. Goals
  (issue 5): peak under 6 GB, planner within 15%.
- `sharded`: tests/test_offline_sharded.py, offline training under the shipped fsdp2, zero2 and
  zero3 accelerate files on the GPU, over NCCL (the CPU tests run them with gloo); one process per
  GPU, at most 2; skipped in the CPU smoke run.

Writes results/gpu-suite-<gpu-name-slug>.json (appended, one record per run, as the benchmarks
do) and gpu-suite-<slug>.md (this run's summary). Without a CUDA device it exits at once with
status 2 and "needs a CUDA GPU".

`--device cpu --tiny` is a smoke run of the same code on CPU for the tests: the shipped tiny
Llama (configs/models/tiny-llama.json) instead of the 1.5B shape, fp32, no quantization, plain
AdamW, short prompts and completions, tiny kernel and GEMM shapes, the chunked backend in place
of Triton. It exercises the code paths and measures nothing meaningful.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PRESET = ROOT / "configs" / "qwen2.5-1.5b-gsm8k-qlora.yaml"
SHAPE_15B = ROOT / "configs" / "models" / "qwen2.5-1.5b.json"
SHAPE_TINY = ROOT / "configs" / "models" / "tiny-llama.json"
PARTS = ("kernels", "bench", "roofline", "step", "sharded")
NO_CUDA_EXIT = 2
GOAL_PEAK_BYTES = 6 * 10**9
GOAL_PLANNER_ERROR = 0.15


@dataclass(frozen=True)
class Sizes:
    """Shapes of one suite run: the real ones, or the CPU smoke run's."""

    check: tuple[int, int, int]         # kernel correctness N, H, V
    kernel: tuple[int, int, int]        # roofline kernel N, H, V
    gemm: tuple[int, ...]               # square GEMM sizes tried for the roofline
    model_shape: Path
    prompt_tokens: int
    completion_tokens: int
    num_generations: int


REAL = Sizes(check=(4096, 1536, 151936), kernel=(16384, 1536, 151936), gemm=(4096, 8192, 16384),
             model_shape=SHAPE_15B, prompt_tokens=256, completion_tokens=512, num_generations=8)
TINY = Sizes(check=(64, 32, 512), kernel=(128, 32, 1024), gemm=(128,), model_shape=SHAPE_TINY,
             prompt_tokens=12, completion_tokens=8, num_generations=4)


# --------------------------------------------------------------------------------------------
# Pure arithmetic and naming (tested on CPU by tests/test_gpu_suite.py)
# --------------------------------------------------------------------------------------------

def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (benchmarks/conftest.py's naming)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def result_paths(out: Path, device_name: str) -> tuple[Path, Path]:
    """(JSON record file, markdown summary) for a device."""
    stem = f"gpu-suite-{slug(device_name)}"
    return out / f"{stem}.json", out / f"{stem}.md"


def gemm_flops(m: int, n: int, k: int) -> int:
    """(m x k) @ (k x n): one multiply and one add per m n k."""
    return 2 * m * n * k


def logprob_flops(n: int, h: int, v: int, trainable_weight: bool = True) -> int:
    """Useful FLOPs of the log-prob forward + backward: the logits (N x H) @ (H x V), the hidden
    gradient (N x V) @ (V x H), and with a trainable LM head the weight gradient
    (V x N) @ (N x H), 2 N H V each."""
    return (3 if trainable_weight else 2) * gemm_flops(n, v, h)


def tflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


def relative_error(estimate: float, measured: float) -> float:
    """Signed: positive when the estimate is above the measurement."""
    return (estimate - measured) / measured


def require_cuda(device: str) -> None:
    """Exit at once (status 2) when the suite is asked for CUDA and there is none."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "`--device cpu --tiny` runs the CPU smoke test instead", file=sys.stderr)
        sys.exit(NO_CUDA_EXIT)


def pytest_summary(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('3 failed, 120 passed, 2 warnings in 9.1s')."""
    lines = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error)", line)]
    if not lines:
        return {}
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1])}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def median_seconds(fn: Callable[[], object], device: str, warmup: int = 2, iters: int = 10) -> float:
    """Median wall time of fn() (CUDA events on the GPU, so only the device work counts)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------

def _pytest(args: list[str], env: dict[str, str], timeout: int = 1800) -> dict:
    """Runs the venv's pytest (not `python -m pytest`, which would put the repo root on sys.path
    and let the repo's kernels/ shadow the `kernels` package transformers imports)."""
    exe = Path(sys.executable).with_name("pytest")
    done = subprocess.run([str(exe), *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, check=False)
    output = done.stdout + done.stderr
    return {"returncode": done.returncode, "summary": pytest_summary(output), "tail": output[-3000:],
            "ok": done.returncode == 0}


def kernel_check(device: str, n: int, h: int, v: int, backend: str, seed: int = 0) -> dict:
    """The `backend` kernel in bf16 against the naive backend on fp32 copies of the same inputs."""
    import torch

    from grpo_fast.kernels import token_logprobs

    torch.manual_seed(seed)
    hidden = torch.randn(n, h, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=device)
    upstream = torch.randn(n, device=device)

    def run(backend_name: str, dtype):
        x = hidden.to(dtype, copy=True).requires_grad_()
        w = weight.to(dtype, copy=True).requires_grad_()
        logp = token_logprobs(x, w, targets, backend=backend_name)
        (logp.float() * upstream).sum().backward()
        return logp.detach().float(), x.grad.float(), w.grad.float()

    got = run(backend, torch.bfloat16)
    ref = run("naive", torch.float32)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    return {"shape": {"N": n, "H": h, "V": v}, "backend": backend, "dtype": "bfloat16",
            "reference": "naive fp32 on the same (bf16-rounded) inputs",
            "logp_max_abs_error": float((got[0] - ref[0]).abs().max()),
            "grad_hidden_rel_error": rel(got[1], ref[1]), "grad_weight_rel_error": rel(got[2], ref[2])}


def part_kernels(device: str, sizes: Sizes, tiny: bool) -> dict:
    out = {}
    if not tiny:
        out["tests"] = _pytest(["tests/test_kernels.py", "-q"], {"GRPO_FAST_TEST_CUDA": "1"})
    out["real_vocab"] = kernel_check(device, *sizes.check, backend="chunked" if tiny else "triton")
    # bf16 logits over 151,936 words: errors of a few 1e-2 in a log-prob are bf16 rounding of
    # the inputs' products, not a kernel bug; 5e-2 relative on the gradients likewise.
    rv = out["real_vocab"]
    out["ok"] = (out.get("tests", {"ok": True})["ok"] and rv["logp_max_abs_error"] < 0.1
                 and max(rv["grad_hidden_rel_error"], rv["grad_weight_rel_error"]) < 5e-2)
    return out


def part_bench(device: str, sizes: Sizes, tiny: bool) -> dict:
    return _pytest(["benchmarks/bench_logprobs.py", "--benchmark-only", "-q"], {})


def part_roofline(device: str, sizes: Sizes, tiny: bool) -> dict:
    import torch

    from grpo_fast.kernels import token_logprobs

    dtype = torch.bfloat16
    gemm = {}
    for size in sizes.gemm:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        seconds = median_seconds(lambda: a @ b, device)
        gemm[size] = tflops(gemm_flops(size, size, size), seconds)
        del a, b
    peak = max(gemm.values())

    n, h, v = sizes.kernel
    backend = "chunked" if tiny else "triton"
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)

    def step():
        hidden.grad = weight.grad = None
        token_logprobs(hidden, weight, targets, backend=backend).sum().backward()

    seconds = median_seconds(step, device, warmup=2, iters=5)
    achieved = tflops(logprob_flops(n, h, v), seconds)
    return {"gemm_bf16_tflops": {str(k): x for k, x in gemm.items()},
            "gemm_bf16_peak_tflops": peak,
            "kernel": {"backend": backend, "N": n, "H": h, "V": v, "seconds": seconds,
                       "flops": logprob_flops(n, h, v), "tflops": achieved,
                       "fraction_of_gemm": achieved / peak},
            "ok": True}


def varied_reward(prompts, completions, **kwargs) -> list[float]:
    """Share of digits in each completion: random text makes it differ within every group, so
    every completion has a non-zero advantage (see the module docstring)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def build_random_checkpoint(shape_file: Path, path: Path, device: str, dtype) -> None:
    """Random weights of `shape_file`'s architecture (bf16 on the GPU) and the byte-level
    tokenizer, saved as a checkpoint: grpo-fast loads quantized models from a checkpoint only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo_fast.modeling import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    config = AutoConfig.for_model(**json.loads(shape_file.read_text()))
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    # Initialised where it will run: 1.5B parameters initialise in a second on a GPU.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model


def step_config(model_dir: Path, data: Path, out: Path, sizes: Sizes, tiny: bool):
    """The 1.5B QLoRA preset pointed at the random checkpoint, one prompt x G per step; for the
    CPU smoke run without quantization, paging or half precision."""
    import yaml

    from grpo_fast.config import config_from_dict

    cfg = yaml.safe_load(PRESET.read_text())
    cfg.update(model_path=str(model_dir), dataset_path=str(data), output_dir=str(out),
               batch_size=1, gradient_accumulation_steps=1, max_steps=2, save_steps=10**6,
               logging_steps=10**6, warmup_ratio=0.0, seed=0)
    online = cfg["online"]
    for key in ("dataset_name", "dataset_config", "dataset_split"):
        online.pop(key, None)
    # Random token prompts: no chat template to render them with.
    online.update(chat_template=False, system_prompt=None)
    online.update(prompt_column="prompt", num_generations=sizes.num_generations,
                  max_prompt_length=sizes.prompt_tokens, max_completion_length=sizes.completion_tokens,
                  rewards=[{"name": "gpu_suite:varied_reward"}], log_completions_steps=0, eval_steps=0)
    if tiny:
        cfg.pop("quantization", None)
        cfg.update(dtype="float32", optim="adamw_torch", attn_implementation="sdpa")
    return config_from_dict(cfg, source="gpu_suite")


def packing_check(model, device: str, vocab: int, seed: int = 0) -> dict:
    """Packed vs padded `token_logprobs` of `model` on 4 rows padded left and right unevenly."""
    import torch

    from grpo_fast import logprobs

    g = torch.Generator().manual_seed(seed)
    prompts, completions = [40, 9, 25, 3], [30, 64, 7, 50]
    P, C = max(prompts), max(completions)
    ids = torch.randint(0, min(vocab, 256), (4, P + C), generator=g)
    attention = torch.zeros(4, P + C, dtype=torch.long)
    completion = torch.zeros(4, P + C, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompts, completions)):
        attention[row, P - p:P + c] = 1
        completion[row, P:P + c] = 1
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    args = [t.to(device) for t in (ids, attention, completion)]
    with torch.no_grad():
        packed, _ = logprobs.token_logprobs(model, *args, position_ids=positions.to(device), packed=True)
        padded, _ = logprobs.token_logprobs(model, *args, position_ids=positions.to(device), packed=False)
    return {"attention": model.config._attn_implementation,
            "logp_max_abs_diff": float((packed - padded).abs().max()),
            "logp_mean_abs": float(padded.abs().sum() / completion[:, 1:].sum())}


def part_step(device: str, sizes: Sizes, tiny: bool) -> dict:
    import torch

    from grpo_fast import plan
    from grpo_fast.online import OnlineTrainer

    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        tmp = Path(tmp)
        build_random_checkpoint(sizes.model_shape, tmp / "model", device,
                                torch.float32 if tiny else torch.bfloat16)
        if device == "cuda":
            # The bf16 copy is gone; hand its 3 GiB back before the 4-bit load.
            torch.cuda.empty_cache()
        # Prompts longer than max_prompt_length: cut from the left, each is exactly that long.
        letters = "abcdefghijklmnopqrstuvwxyz"
        g = torch.Generator().manual_seed(0)
        rows = ["".join(letters[i] for i in torch.randint(0, 26, (2 * sizes.prompt_tokens,), generator=g))
                for _ in range(4)]
        (tmp / "data.jsonl").write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
        cfg = step_config(tmp / "model", tmp / "data.jsonl", tmp / "out", sizes, tiny)

        trainer = OnlineTrainer(cfg)
        # An id outside the vocabulary is never sampled: every completion runs to the limit.
        trainer.eos_ids = [trainer.model.config.vocab_size]
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        steps = []
        for _ in range(2):
            metrics, _ = trainer.step([trainer.prompts[i] for i in trainer.stream.take(cfg.batch_size)])
            steps.append(metrics)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        reserved = torch.cuda.max_memory_reserved() if device == "cuda" else None
        packing = packing_check(trainer.model, device, trainer.model.config.vocab_size)

        estimate = plan.estimate(cfg, plan.model_shape(str(tmp / "model")))
    last = steps[-1]
    sequences = cfg.batch_size * cfg.online.num_generations
    generated = sequences * last["completions/mean_length"]
    trained = sequences * (sizes.prompt_tokens + last["completions/mean_length"])
    out = {"model_shape": str(sizes.model_shape.relative_to(ROOT)),
           "attention": trainer.model.config._attn_implementation,
           "quantization": None if tiny else "nf4 + double quant, compute bfloat16",
           "sequences": sequences, "prompt_tokens": sizes.prompt_tokens,
           "completion_tokens": last["completions/mean_length"],
           "rollout_seconds": last["time/rollout"], "train_seconds": last["time/train"],
           "rollout_tokens_per_s": generated / last["time/rollout"],
           "train_tokens_per_s": trained / last["time/train"],
           "peak_allocated_bytes": peak, "peak_reserved_bytes": reserved,
           "planner_allocated_bytes": estimate.allocated, "planner_total_bytes": estimate.total,
           "packing": packing, "loss": last["loss"]}
    out["ok"] = last["completions/mean_length"] == sizes.completion_tokens
    if peak is not None:
        out["planner_relative_error"] = relative_error(estimate.allocated, peak)
        out["goals"] = {"peak_under_6GB": peak < GOAL_PEAK_BYTES,
                        "planner_within_15pct": abs(out["planner_relative_error"]) <= GOAL_PLANNER_ERROR}
    return out


def part_sharded(device: str, sizes: Sizes, tiny: bool) -> dict:
    return {"skipped": "offline sharding needs CUDA", "ok": True} if tiny else \
        _pytest(["tests/test_offline_sharded.py", "-q"], {})


RUNNERS = {"kernels": part_kernels, "bench": part_bench, "roofline": part_roofline, "step": part_step,
           "sharded": part_sharded}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def markdown(record: dict) -> str:
    """A short summary of one run for benchmarks/README.md."""
    lines = [f"# GPU suite: {record['device_name']}", "",
             f"{record['date']}, torch {record['versions']['torch']}, "
             f"transformers {record['versions']['transformers']}"
             + (" (CPU smoke run: measures nothing)" if record["tiny"] else ""), ""]
    parts = record["parts"]
    if "kernels" in parts:
        k = parts["kernels"]
        if "error" in k:
            lines.append(f"- kernels: error: {k['error']}")
        else:
            tests = k.get("tests", {}).get("summary", "not run")
            rv = k["real_vocab"]
            lines.append(f"- kernels: tests {tests}; {rv['backend']} vs naive fp32 at "
                         f"N={rv['shape']['N']} H={rv['shape']['H']} V={rv['shape']['V']}: log-prob max abs "
                         f"error {rv['logp_max_abs_error']:.2e}, grad rel error hidden "
                         f"{rv['grad_hidden_rel_error']:.2e} / weight {rv['grad_weight_rel_error']:.2e}")
    if "bench" in parts:
        b = parts["bench"]
        lines.append(f"- bench_logprobs: {b.get('summary', b.get('error'))} (table in logprobs-<gpu>.json)")
    if "roofline" in parts:
        r = parts["roofline"]
        if "error" in r:
            lines.append(f"- roofline: error: {r['error']}")
        else:
            k = r["kernel"]
            lines.append(f"- roofline: bf16 GEMM {r['gemm_bf16_peak_tflops']:.1f} TFLOP/s; {k['backend']} kernel "
                         f"fwd+bwd N={k['N']} H={k['H']} V={k['V']}: {k['seconds'] * 1e3:.1f} ms, "
                         f"{k['tflops']:.1f} TFLOP/s = {k['fraction_of_gemm']:.0%} of GEMM")
    if "step" in parts:
        s = parts["step"]
        if "error" in s:
            lines.append(f"- GRPO step: error: {s['error']}")
        else:
            err = s.get("planner_relative_error")
            lines += [
                f"- GRPO step ({s['model_shape']}, {s['quantization'] or 'unquantized'}, {s['attention']}, "
                f"{s['sequences']} x ({s['prompt_tokens']} + {s['completion_tokens']:.0f}) tokens):",
                f"  peak allocated {_gib(s['peak_allocated_bytes'])} (reserved {_gib(s['peak_reserved_bytes'])}), "
                f"planner {_gib(s['planner_allocated_bytes'])}"
                + (f" ({err:+.1%})" if err is not None else ""),
                f"  rollout {s['rollout_tokens_per_s']:.0f} tok/s, train step {s['train_tokens_per_s']:.0f} tok/s; "
                f"packed vs padded log-probs max abs diff {s['packing']['logp_max_abs_diff']:.2e} "
                f"({s['packing']['attention']})"]
            if "goals" in s:
                lines.append(f"  goals: {s['goals']}")
    if "sharded" in parts:
        d = parts["sharded"]
        lines.append(f"- offline under fsdp2 / zero2 / zero3 (tests/test_offline_sharded.py): "
                     f"{d.get('summary', d.get('skipped', d.get('error')))}")
    return "\n".join(lines) + "\n"


def run(device: str, tiny: bool, parts: list[str], out: Path) -> dict:
    import torch
    import transformers

    # benchmarks/ on sys.path: the step's reward is "gpu_suite:varied_reward".
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sizes = TINY if tiny else REAL
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu-smoke"
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device_name": device_name, "tiny": tiny, "load_avg": list(os.getloadavg()),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "cuda": torch.version.cuda}, "parts": {}}
    for part in parts:
        start = time.perf_counter()
        try:
            result = RUNNERS[part](device, sizes, tiny)
        except Exception as exc:  # one part's failure is recorded, the others still run
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                      "traceback": traceback.format_exc()[-4000:]}
        result["wall_seconds"] = round(time.perf_counter() - start, 1)
        record["parts"][part] = result
        print(f"[gpu_suite] {part}: {'ok' if result.get('ok') else 'FAILED'} "
              f"({result['wall_seconds']} s)", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    json_path, md_path = result_paths(out, device_name)
    out.mkdir(parents=True, exist_ok=True)
    records = json.loads(json_path.read_text()) if json_path.exists() else []
    json_path.write_text(json.dumps(records + [record], indent=1) + "\n")
    md_path.write_text(markdown(record))
    print(markdown(record))
    print(f"[gpu_suite] wrote {json_path} and {md_path}")
    return record


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy shapes (the CPU smoke run)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs the smoke test only: add --tiny")
    if args.device == "cpu":
        # Before torch is imported: grpo-fast's trainer takes CUDA whenever it sees a GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    require_cuda(args.device)
    if args.device == "cpu":
        import torch

        torch.set_num_threads(1)
    record = run(args.device, args.tiny, parts, args.out)
    return 0 if all(p.get("ok") for p in record["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
