"""Test set-up shared by every test: CPU-only, offline, Triton in interpreter mode.

TRITON_INTERPRET must be set before triton is first imported, which is why it lives here at
import time rather than in a fixture (importing torch does not import triton). On a CUDA
machine set GRPO_FAST_TEST_CUDA=1 to run the kernel tests on the GPU instead (the interpreter is
then left off).
"""

import os

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
