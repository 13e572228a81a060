"""A run's output directory, shared by the offline and online trainers.

    out = prepare_output_dir("outputs/run", resume=False)      # refuses an earlier run's output
    ckpt = latest_checkpoint("outputs/run", ONLINE_CHECKPOINT_FILES)  # newest *complete* one
    with atomic_directory(out / "checkpoint-40") as tmp: ...   # all or nothing
    MetricsWriter(out / METRICS_FILE).write({"step": 40, "loss": float("nan")})  # -> null

What lives here is what makes a run directory trustworthy: nothing of an earlier run is
overwritten or appended to unless `--resume` asks for it; a checkpoint directory appears only
once everything in it is written (a kill mid-save leaves a `tmp-checkpoint-*` that resume
ignores and the next save removes); `--resume` takes the newest complete checkpoint and says which
it skipped; JSONL logs are strict JSON (non-finite numbers are written as null) and a torn last
line (a kill mid-write) is dropped, not fatal; RNG states are saved as tensors and JSON so that
loading a checkpoint never unpickles code (`torch.load(weights_only=True)` everywhere). Imports
no torch at module level, so `grpo-fast plot` stays light.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .config import ConfigError

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
COMPLETIONS_FILE = "completions.jsonl"
CONFIG_FILE = "grpo_config.yaml"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = "tmp-"
RNG_TENSORS = "rng_state.safetensors"
RNG_JSON = "rng_state.json"

# What an earlier run leaves in its output_dir. Any of these means "another run lives here":
# its final model or adapter, its logs, its resolved config, its checkpoints. (Not base_model/,
# which a run writes before its first step: alone, it is a run that died before saving anything,
# and the next run rewrites it.)
RUN_MARKERS = (METRICS_FILE, COMPLETIONS_FILE, CONFIG_FILE, "adapter_config.json",
               "adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin")

# A checkpoint counts as complete only when every one of these is in it (weights are checked
# separately: adapter or full model, single file or sharded); a tuple is a choice of files.
ONLINE_STATE_FILE = "online_state.json"
ONLINE_CHECKPOINT_FILES = (ONLINE_STATE_FILE, "optimizer.pt", "scheduler.pt", RNG_TENSORS, RNG_JSON)
# HF's Trainer under DeepSpeed leaves the optimizer to DeepSpeed's own checkpoint: its partitions
# in global_step<N>/, named by the `latest` file it writes last.
OFFLINE_CHECKPOINT_FILES = ("trainer_state.json", ("optimizer.pt", "latest"), "scheduler.pt")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------------
# The output directory
# ---------------------------------------------------------------------------------------------

def checkpoint_step(path: Path) -> Optional[int]:
    """The step of a `checkpoint-<step>` directory name, else None."""
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    tail = name[len(CHECKPOINT_PREFIX):]
    return int(tail) if tail.isdigit() else None


def checkpoints(output_dir: Path) -> list[Path]:
    """Every `checkpoint-<step>` directory, oldest step first."""
    found = [p for p in output_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def missing_files(ckpt: Path, required: Sequence[str | tuple[str, ...]]) -> list[str]:
    choices = [(name,) if isinstance(name, str) else name for name in required]
    missing = [" or ".join(names) for names in choices if not any((ckpt / n).is_file() for n in names)]
    if not any((ckpt / name).is_file() for name in WEIGHT_FILES):
        missing.append("model or adapter weights")
    return missing


def latest_checkpoint(output_dir: str | Path, required: Sequence[str | tuple[str, ...]]) -> Optional[Path]:
    """The newest checkpoint holding every `required` file and its weights. Incomplete newer
    ones (a kill mid-save by an older version, a copy cut short) are named in a warning."""
    for ckpt in reversed(checkpoints(Path(output_dir))):
        missing = missing_files(ckpt, required)
        if not missing:
            return ckpt
        logger.warning("skipping incomplete checkpoint %s (missing %s)", ckpt, ", ".join(missing))
    return None


def earlier_run_files(output_dir: Path) -> list[str]:
    """Names in `output_dir` that an earlier run left there (see RUN_MARKERS)."""
    if not output_dir.is_dir():
        return []
    found = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    found += [p.name for p in checkpoints(output_dir)][-1:]
    return found


def check_writable(output_dir: Path, key: str = "output_dir") -> None:
    """`output_dir` is (or can be made) a directory this process can write to. Checked before
    any model loads, so that a read-only or mistyped path fails in seconds, not after step 1."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"{key}: {output_dir} exists and is not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".grpo-fast-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}: {output_dir} is not writable: {e.strerror or e}") from None


def prepare_output_dir(output_dir: str | Path, resume: bool,
                       required: Sequence[str | tuple[str, ...]]) -> Optional[Path]:
    """Check `output_dir` before anything is loaded or written; returns the checkpoint to resume
    from (None for a fresh run).

    A fresh run refuses a directory holding any earlier run's output: it would overwrite its
    final model and config, append to its logs, and rotation would delete its checkpoints.
    `--resume` needs a complete checkpoint there."""
    out = Path(output_dir)
    check_writable(out)
    if resume:
        ckpt = latest_checkpoint(out, required)
        if ckpt is None:
            raise ConfigError(f"--resume: no complete checkpoint-* directory in output_dir {out}")
        return ckpt
    found = earlier_run_files(out)
    if found:
        raise ConfigError(f"output_dir {out} already holds another run ({', '.join(found)}); "
                          "pass --resume to continue it, or choose another output_dir")
    return None


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to write into; on success it replaces `final` by a
    rename, so `final` is either absent, the old one, or complete. On error the temporary
    directory is removed and nothing at `final` changes."""
    tmp = final.with_name(TMP_PREFIX + final.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def rotate_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove older ones and leftover temporary ones."""
    for old in checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old)
    for tmp in output_dir.glob(TMP_PREFIX + CHECKPOINT_PREFIX + "*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_final(cfg, model, tokenizer, output_dir: str | Path, state_dict: Optional[dict] = None) -> None:
    """The final adapter (or full model), tokenizer and resolved config, written into a
    temporary directory first and then moved file by file into `output_dir`: each file is
    replaced whole, and the config, moved last, marks the run as finished. `state_dict`: the
    model's whole state dict when the model holds only shards of it (FSDP2)."""
    out = Path(output_dir)
    staged = out / (TMP_PREFIX + "final")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged, state_dict=state_dict)
    tokenizer.save_pretrained(staged)
    (staged / CONFIG_FILE).write_text(cfg.to_yaml())
    for path in sorted(staged.iterdir(), key=lambda p: p.name == CONFIG_FILE):
        os.replace(path, out / path.name)
    staged.rmdir()
    logger.info("saved %s, tokenizer and %s to %s",
                "LoRA adapter" if cfg.lora.enabled else "model", CONFIG_FILE, out)


# ---------------------------------------------------------------------------------------------
# JSONL logs
# ---------------------------------------------------------------------------------------------

def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class JsonlWriter:
    """Appends rows to a JSONL file as strict JSON, one flushed line per row."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict) -> None:
        self.write_many([row])

    def write_many(self, rows: Sequence[dict]) -> None:
        text = "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in rows)
        with open(self.path, "a") as f:
            f.write(text)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL log. A last line that does not parse is a write cut short by a kill:
    it is dropped with a warning. A bad line elsewhere is an error naming it."""
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                logger.warning("%s:%d: dropped a torn last line (a write cut short)", path, number)
                break
            raise ValueError(f"{path}:{number}: invalid JSON: {e.msg}") from None
    return rows


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the rows with step <= `step` (and drop a torn last line): what a resumed run
    finds of the rows its killed predecessor wrote after the checkpoint it resumes from."""
    if not path.is_file():
        return
    rows = read_jsonl(path)
    kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# RNG states, without pickle
# ---------------------------------------------------------------------------------------------

def capture_rng_state() -> tuple[dict, dict]:
    """This process's Python, numpy, torch and CUDA RNG states as (tensors, JSON-able dict)."""
    import numpy as np
    import torch

    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    meta = {"python": {"version": version, "state": list(mt), "gauss": gauss},
            "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
    return tensors, meta


def _rng_files(directory: Path, rank: int) -> tuple[Path, Path]:
    """Rank 0's files keep the single-process names; rank r's add `-rank<r>`."""
    suffix = "" if rank == 0 else f"-rank{rank}"
    return (directory / RNG_TENSORS.replace(".safetensors", f"{suffix}.safetensors"),
            directory / RNG_JSON.replace(".json", f"{suffix}.json"))


def save_rng_state(directory: Path, states: Optional[list[tuple[dict, dict]]] = None) -> None:
    """RNG states as safetensors + JSON (no pickle): this process's, or `states[r]` of every rank r
    (`capture_rng_state` gathered by the main process, which writes the checkpoint)."""
    from safetensors.torch import save_file

    for rank, (tensors, meta) in enumerate(states or [capture_rng_state()]):
        tensor_file, json_file = _rng_files(directory, rank)
        save_file(tensors, str(tensor_file))
        json_file.write_text(json.dumps(meta))


def load_rng_state(directory: Path, rank: int = 0) -> None:
    """Restore the RNG states `save_rng_state` wrote for `rank`."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    tensor_file, json_file = _rng_files(directory, rank)
    tensors = load_file(str(tensor_file))
    meta = json.loads(json_file.read_text())
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = meta["numpy"]
    np.random.set_state((nps["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")),
                                       key=lambda k: int(k.split("_")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def load_torch_state(path: Path, map_location: Any = None) -> Any:
    """`torch.load` that can only rebuild tensors and plain containers, never run code."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)
