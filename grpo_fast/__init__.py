"""grpo-fast: a performance-first GRPO trainer for causal LMs.

Offline GRPO (scored completions, listwise KL) and online GRPO (DeepSeekMath: sampled groups,
reward functions, group-relative advantages, clipped surrogate), with a fused Triton log-prob
kernel that never materializes the (tokens x vocab) logits. Run `grpo-fast --help`.
"""

import logging

__version__ = "0.1.0"

# On a CPU with AVX512-BF16, importing bitsandbytes tries to fetch a gemm_4bit_forward kernel from
# the hub (the `kernels` package) and, failing, warns at every start to `pip install kernels`.
# That kernel only serves bitsandbytes' packed CPU 4-bit layout, which `unpack_cpu_4bit_layout`
# turns off on every model grpo-fast loads, so the advice is wrong here: drop exactly that
# message. It lives here, in the package's first import, because the filter only acts if it is
# installed before bitsandbytes is first imported (peft and transformers' Trainer import it).
BNB_CPU_OPS_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_HINT = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropKernelsHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_KERNELS_HINT)


logging.getLogger(BNB_CPU_OPS_LOGGER).addFilter(_DropKernelsHint())
