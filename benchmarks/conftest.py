"""Benchmark collection and result recording.

Benchmarks live in `bench_*.py` files (collected through `python_files` in pyproject.toml),
and the repo's `testpaths = ["tests"]` keeps a plain `pytest` away from this directory. They
run only when asked for:

    pytest benchmarks/ --benchmark-only

Results are appended to `benchmarks/results/<name>-<device>.json` (one JSON list per device)
through the `record_result` fixture, each record stamped with the date and library versions.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


@pytest.fixture(scope="session")
def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


@pytest.fixture(scope="session")
def device_slug() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


@pytest.fixture
def record_result(request, device_slug):
    """Appends one record to results/<module name without bench_>-<device>.json."""
    stem = request.module.__name__.removeprefix("bench_")
    path = RESULTS / f"{stem}-{device_slug}.json"

    def record(entry: dict) -> None:
        RESULTS.mkdir(exist_ok=True)
        records = json.loads(path.read_text()) if path.exists() else []
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        records.append(
            {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "test": request.node.name,
                "torch": torch.__version__,
                "triton": triton_version,
                **entry,
            }
        )
        path.write_text(json.dumps(records, indent=1) + "\n")

    return record
