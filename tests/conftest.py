"""Test set-up shared by every test: CPU-only, offline, Triton in interpreter mode.

TRITON_INTERPRET must be set before triton is first imported, which is why it lives here at
import time rather than in a fixture (importing torch does not import triton). On a CUDA
machine set GRPO_FAST_TEST_CUDA=1 to run the kernel tests on the GPU instead (the interpreter is
then left off).
"""

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("GRPO_FAST_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Test models are tiny (hidden 64-128): intra-op threads only add spin-waiting, which on a busy
# 2-core machine makes a training step many times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_lora_model():
    """The shipped tiny Llama (configs/models/tiny-llama.json, random weights) with the default
    LoRA adapter, SDPA attention, on CPU; one per test module. peft starts lora_B at zero, where
    lora_A gets no gradient and the adapter changes nothing: both get a value here."""
    from grpo_fast.config import config_from_dict
    from grpo_fast.modeling import load_model_and_tokenizer

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama.json")
    cfg = config_from_dict({"mode": "offline", "dataset_path": "unused.jsonl", "seed": 0,
                            "model_path": tiny, "attn_implementation": "sdpa"})
    model, _ = load_model_and_tokenizer(cfg, torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


@pytest.fixture(params=["native", "avx512bf16-simulated"])
def cpu_kind(request, monkeypatch) -> str:
    """This CPU as it is, and one with AVX512-BF16 (AMD Zen4, recent Xeons) simulated: bitsandbytes
    reads has_avx512bf16() in Linear4bit.__init__ only, so the 4-bit modules built while this
    fixture is active are exactly what such a CPU builds (it switches them to a packed CPU layout
    at inference; grpo_fast.modeling.unpack_cpu_4bit_layout turns that off)."""
    if request.param == "avx512bf16-simulated":
        import bitsandbytes.nn.modules

        monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    return request.param
