"""Forward + backward time and peak memory of the log-prob backends (naive / chunked / triton).

One step = `token_logprobs(hidden, weight, targets, backend=...)`, `.sum().backward()`, with a
trainable LM head (the most expensive case: hidden and weight gradients). Time comes from
pytest-benchmark; peak memory (bytes one step adds on top of its inputs, see memory.py) goes
into `benchmark.extra_info` and, with the timings, is appended to
`benchmarks/results/logprobs-<device>.json`.

CPU: naive and chunked at N=4096, H=256, V=32000 fp32 plus a small shape (the Triton
interpreter is far too slow to benchmark). CUDA: all three backends, bf16, N in {4096, 16384}
x H in {896, 1536, 3584} x V in {32000, 128256, 151936} (Qwen2.5-0.5B/1.5B/7B widths, Llama-3
and Qwen vocabularies); a case that runs out of GPU memory is skipped with the measured reason.

    pytest benchmarks/bench_logprobs.py --benchmark-only
"""

from __future__ import annotations

import itertools

import pytest
import torch
from memory import peak_memory_bytes

from grpo_fast.kernels import token_logprobs

ON_CUDA = torch.cuda.is_available()

if ON_CUDA:
    DEVICE = "cuda"
    BACKENDS = ("naive", "chunked", "triton")
    SHAPES = [
        (n, h, v, torch.bfloat16)
        for n, h, v in itertools.product((4096, 16384), (896, 1536, 3584), (32000, 128256, 151936))
    ]
    ROUNDS = 5
else:
    DEVICE = "cpu"
    BACKENDS = ("naive", "chunked")
    SHAPES = [(4096, 256, 32000, torch.float32), (1024, 128, 8192, torch.float32)]
    # A CPU step at the large shape takes seconds; 3 rounds bound the file to a few minutes.
    ROUNDS = 3

# Warm-up shape for the memory child: exercises every code path, adds ~nothing to the peak.
WARMUP_SHAPE = {"n_tokens": 64, "width": 32, "vocab": 512}


def make_step(backend: str, n_tokens: int, width: int, vocab: int, dtype: str, device: str,
              seed: int = 0):
    """Allocates inputs and returns a callable running one forward + backward step."""
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    hidden = torch.randn(n_tokens, width, device=device, dtype=torch_dtype).requires_grad_()
    weight = (torch.randn(vocab, width, device=device) / width**0.5).to(torch_dtype)
    weight.requires_grad_()
    targets = torch.randint(0, vocab, (n_tokens,), device=device)

    def step():
        hidden.grad = None
        weight.grad = None
        token_logprobs(hidden, weight, targets, backend=backend).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def _case_id(shape):
    n, h, v, dtype = shape
    return f"N{n}-H{h}-V{v}-{str(dtype).removeprefix('torch.')}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[_case_id(s) for s in SHAPES])
def test_logprobs_forward_backward(benchmark, backend, shape, record_result, device_name):
    n_tokens, width, vocab, dtype = shape
    kwargs = {
        "backend": backend, "n_tokens": n_tokens, "width": width, "vocab": vocab,
        "dtype": str(dtype).removeprefix("torch."), "device": DEVICE,
    }
    warmup = {**kwargs, **WARMUP_SHAPE}
    try:
        peak = peak_memory_bytes("bench_logprobs:make_step", kwargs, warmup, DEVICE)
        step = make_step(**kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.empty_cache()
        pytest.skip(f"{backend} {_case_id(shape)} does not fit in {total:.0f} GiB: {exc}"[:300])
    benchmark.extra_info.update(
        {"device": device_name, "peak_bytes": peak, "peak_mib": round(peak / 2**20, 1), **kwargs}
    )
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    stats = benchmark.stats.stats
    record_result(
        {
            **kwargs,
            "device_name": device_name,
            "mean_s": stats.mean,
            "min_s": stats.min,
            "stddev_s": stats.stddev,
            "rounds": stats.rounds,
            "peak_bytes": peak,
        }
    )
