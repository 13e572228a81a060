"""Reference (naive) token and sequence log-probs: materializes the full (tokens x vocab) logits.

This is the ground truth the fused Triton kernel and the chunked PyTorch fallback are tested
and benchmarked against, and the `backend="naive"` path of `grpo_fast.kernels`. It mirrors what
a plain training loop does: the LM-head matmul runs in the input dtype (bf16/fp16 matmuls
accumulate in fp32 internally), the logits are upcast to at least fp32, then bias,
temperature and log-softmax follow in that precision. Memory is O(tokens x vocab): at
N=16384 tokens and V=151936 the fp32 logits alone are 10 GB, which is why the other backends
exist. Tests call these functions on float64 copies of their inputs to get exact references.

    from grpo_fast.kernels import reference_token_logprobs
    logp = reference_token_logprobs(hidden, lm_head.weight, targets)
"""

from __future__ import annotations

import torch

__all__ = ["reference_token_logprobs", "reference_sequence_logprobs"]


def _tempered_log_softmax(hidden, weight, bias, temperature):
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    logits = (hidden.to(weight.dtype) @ weight.T).to(acc_dtype)
    if bias is not None:
        logits = logits + bias.to(acc_dtype)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return -(log_probs.exp() * log_probs).sum(-1)


def reference_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
):
    """`log_softmax((hidden @ weight.T + bias) / temperature)` gathered at `targets`.

    hidden (..., H), weight (V, H), targets (...) integer in [0, V), bias (V,) or None.
    Returns log-probs (...) in fp32 (fp64 for fp64 weights), differentiable; with
    `return_entropy` also the detached per-token entropy (...) of the same distribution.
    No validation: use `grpo_fast.kernels.token_logprobs(..., backend="naive")` for that.
    """
    log_probs = _tempered_log_softmax(hidden, weight, bias, temperature)
    logp = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if return_entropy:
        return logp, _entropy(log_probs)
    return logp


def reference_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    normalize: bool = False,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
):
    """Masked per-row sum (mean with `normalize`) of the token log-probs.

    hidden (B, T, H), targets and mask (B, T); mask entries are token weights (bool or
    numeric, 0 = ignored; targets at ignored positions may be anything, e.g. -100).
    Returns (B,) log-probs; a row whose mask is all zero gives 0. With `return_entropy` also
    the detached token entropy (B, T), 0 at ignored positions.
    """
    weights = mask.to(torch.promote_types(weight.dtype, torch.float32))
    safe_targets = torch.where(weights != 0, targets.long(), 0)
    log_probs = _tempered_log_softmax(hidden, weight, bias, temperature)
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    seq = (logp * weights).sum(-1)
    if normalize:
        total = weights.sum(-1)
        # Dividing by a 1 instead of a 0 keeps fully masked rows at 0 and, unlike a
        # torch.where on the quotient, keeps their gradient 0 rather than NaN.
        seq = seq / torch.where(total != 0, total, torch.ones_like(total))
    if return_entropy:
        return seq, torch.where(weights != 0, _entropy(log_probs), 0.0)
    return seq
