"""Peak-memory measurement for the benchmarks: how many bytes one call adds at its peak.

CUDA: in process. `torch.cuda.reset_peak_memory_stats()`, run the call, report
`max_memory_allocated()` minus what was allocated before (tensors only, not the caching
allocator's reserve).

CPU: in a fresh subprocess. glibc malloc keeps freed blocks below its (dynamic, up to 32 MiB)
mmap threshold in the heap, so RSS would not follow tensor lifetimes; the child runs with
MALLOC_MMAP_THRESHOLD_=65536, which makes every allocation >= 64 KiB its own mmap, unmapped
on free. The child runs a small warm-up call (loads libraries, starts thread pools), builds
the real inputs, and reports the growth of its peak RSS (`ru_maxrss`, read before and after)
across the measured call. One catch: Linux hands the spawning process's peak RSS to a child's
`ru_maxrss` at exec (subprocess spawns via vfork, sharing pytest's address space until then),
so after a 1.5 GB naive case every smaller peak would read as 0. The child therefore forks
once, before importing torch, and measures in that fork, whose `ru_maxrss` starts at the few
MiB of a bare interpreter.

A call is described by a factory, "module:function" importable from this directory, that
takes keyword arguments, allocates its inputs and returns a zero-argument callable:

    from memory import peak_memory_bytes
    peak = peak_memory_bytes("bench_logprobs:make_step", {...}, {...small...}, device="cpu")

Run as a script, this file is that child process (internal).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import subprocess
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# One mmap per allocation from 64 KiB up (see the module docstring).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _load(factory: str):
    module, name = factory.split(":")
    return getattr(importlib.import_module(module), name)


def cuda_peak_bytes(step) -> int:
    """Bytes `step()` adds to CUDA allocated memory at its peak."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def cpu_peak_bytes(factory: str, kwargs: dict, warmup_kwargs: dict) -> int:
    """Peak RSS growth of one call, measured in a fresh subprocess (see module docstring)."""
    command = [
        sys.executable, str(Path(__file__).resolve()), factory,
        json.dumps(kwargs), json.dumps(warmup_kwargs),
    ]
    env = {**os.environ, **CHILD_ENV}
    done = subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"])


def peak_memory_bytes(factory: str, kwargs: dict, warmup_kwargs: dict, device: str) -> int:
    """Peak extra bytes of one call of `factory(**kwargs)()` on `device` ("cpu" or "cuda")."""
    if device == "cuda":
        step = _load(factory)(**kwargs)
        return cuda_peak_bytes(step)
    return cpu_peak_bytes(factory, kwargs, warmup_kwargs)


def _child(factory: str, kwargs: dict, warmup_kwargs: dict) -> None:
    make = _load(factory)
    make(**warmup_kwargs)()
    step = make(**kwargs)
    gc.collect()
    # ru_maxrss is in KiB on Linux.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_bytes": (after - before) * 1024}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="memory-measurement child process (internal)")
    parser.add_argument("factory")
    parser.add_argument("kwargs", type=json.loads)
    parser.add_argument("warmup_kwargs", type=json.loads)
    args = parser.parse_args()
    pid = os.fork()  # see the module docstring: a fresh ru_maxrss baseline
    if pid == 0:
        code = 0
        try:
            _child(args.factory, args.kwargs, args.warmup_kwargs)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
