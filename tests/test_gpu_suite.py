"""benchmarks/gpu_suite.py without a GPU: its arithmetic and naming, the immediate exit when
CUDA is missing, and the `--device cpu --tiny` smoke run end to end (a subprocess, as it is
run; it exercises the code paths and measures nothing).

    pytest tests/test_gpu_suite.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_suite  # noqa: E402


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600, check=False)


def test_result_files_are_named_after_the_card(tmp_path):
    assert gpu_suite.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert gpu_suite.result_paths(tmp_path, "NVIDIA GeForce RTX 4090") == (
        tmp_path / "gpu-suite-nvidia-geforce-rtx-4090.json",
        tmp_path / "gpu-suite-nvidia-geforce-rtx-4090.md")


def test_flop_and_roofline_arithmetic():
    assert gpu_suite.gemm_flops(2, 3, 4) == 48
    n, h, v = gpu_suite.REAL.kernel
    assert (n, h, v) == (16384, 1536, 151936)
    assert gpu_suite.logprob_flops(n, h, v) == 6 * n * h * v                    # 22.94 TFLOP
    assert gpu_suite.logprob_flops(n, h, v, trainable_weight=False) == 4 * n * h * v
    # 22.94 TFLOP in 50 ms is 458.8 TFLOP/s: about half of an H100's dense bf16 GEMM rate.
    assert gpu_suite.tflops(6 * n * h * v, 0.05) == pytest.approx(458.83, abs=0.01)
    assert gpu_suite.relative_error(5.75, 5.0) == pytest.approx(0.15)
    assert gpu_suite.relative_error(4.0, 5.0) == pytest.approx(-0.2)


def test_pytest_summary_parsing():
    out = "....F\n=== 1 failed, 120 passed, 2 warnings in 9.10s ==="
    assert gpu_suite.pytest_summary(out) == {"failed": 1, "passed": 120}
    assert gpu_suite.pytest_summary("no tests ran") == {}


def test_no_cuda_exits_at_once_with_a_clear_message(tmp_path):
    done = run_script("--out", str(tmp_path), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == gpu_suite.NO_CUDA_EXIT
    assert "needs a CUDA GPU" in done.stderr
    assert not list(tmp_path.iterdir())


def test_cpu_smoke_run(tmp_path):
    done = run_script("--device", "cpu", "--tiny", "--parts", "kernels,roofline,step",
                      "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (record,) = json.loads((tmp_path / "gpu-suite-cpu-smoke.json").read_text())
    assert record["tiny"] and set(record["parts"]) == {"kernels", "roofline", "step"}
    kernels, roofline, step = (record["parts"][k] for k in ("kernels", "roofline", "step"))
    assert kernels["real_vocab"]["logp_max_abs_error"] < 0.1
    assert roofline["kernel"]["flops"] == gpu_suite.logprob_flops(*gpu_suite.TINY.kernel)
    assert roofline["gemm_bf16_peak_tflops"] > 0
    # EOS disabled: every completion runs to the limit; every row trained on.
    assert step["completion_tokens"] == gpu_suite.TINY.completion_tokens
    assert step["sequences"] == gpu_suite.TINY.num_generations
    assert step["rollout_tokens_per_s"] > 0 and step["train_tokens_per_s"] > 0
    assert step["planner_allocated_bytes"] > 0 and step["peak_allocated_bytes"] is None
    assert step["packing"]["logp_max_abs_diff"] < 1e-4
    assert "CPU smoke run" in (tmp_path / "gpu-suite-cpu-smoke.md").read_text()
