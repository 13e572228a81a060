"""grpo-fast: a performance-first GRPO trainer for causal LMs.

Offline GRPO (scored completions, listwise KL) and online GRPO (DeepSeekMath: sampled groups,
reward functions, group-relative advantages, clipped surrogate), with a fused Triton log-prob
kernel that never materializes the (tokens x vocab) logits. Run `grpo-fast --help`.
"""

__version__ = "0.1.0"
