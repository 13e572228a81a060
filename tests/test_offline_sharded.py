"""Offline training sharded through the shipped accelerate configs on a GPU: FSDP2 (fsdp2.yaml,
grpo-fast's own sharding), ZeRO-2 and ZeRO-3 (zero2.yaml, zero3.yaml, applied by HF's Trainer and
accelerate) over NCCL, one process per GPU, at most 2. tests/test_offline_ddp.py runs all three
on 2 CPU ranks (gloo); this is the CUDA path. The loss reads the LM head inside the sharded
model's forward (FSDP2's root, ZeRO-3's head module); a run goes to the end, logs every row once
and writes the whole model.

    pytest tests/test_offline_sharded.py
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_online_ddp import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path (on CPU: tests/test_offline_ddp.py)")
@pytest.mark.parametrize("strategy", ["fsdp2", "zero2", "zero3"])
def test_offline_trains_sharded(tmp_path, strategy):
    if strategy != "fsdp2" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("ZeRO needs the deepspeed package")
    from safetensors.torch import load_file

    from grpo_fast.rundir import read_jsonl

    out = tmp_path / "run"
    procs = min(2, torch.cuda.device_count())
    done = subprocess.run(["accelerate", "launch", "--config_file", str(ROOT / "configs" / "accelerate" / f"{strategy}.yaml"),
                           "--num_processes", str(procs), "--main_process_port", str(free_port()), "--no_python",
                           "grpo-fast", "train", "--config", str(ROOT / "configs" / "tiny-offline.yaml"),
                           "--set", f"output_dir={out}", "--set", "max_steps=4", "--set", "logging_steps=1",
                           "--set", "lora.enabled=false", "--set", "save_steps=2"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    weights = load_file(out / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape == (259, 64), "the saved model is whole"
