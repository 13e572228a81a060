"""Chunked PyTorch log-probs: the CPU backend of `grpo_fast.kernels` (``backend="chunked"``).

Tokens are processed `chunk` at a time, so at most a (chunk x V) slab of logits exists at
once instead of the full (N x V). The custom autograd.Function saves only its inputs plus one
fp32 log-sum-exp per token, and recomputes each chunk's logits in backward (one extra
LM-head matmul, the price of not storing N x V activations). Tokens whose weight is 0 (masked
positions of `sequence_logprobs`) are dropped before any vocabulary work. Numerics follow
reference.py: matmul in the input dtype, softmax math in fp32 (fp64 for fp64 inputs).

    from grpo_fast.kernels.chunked import chunked_logprobs
    logp, _ = chunked_logprobs(hidden, weight, targets)

Tested by tests/test_kernels.py, benchmarked by benchmarks/bench_logprobs.py.
"""

from __future__ import annotations

import torch

__all__ = ["chunked_logprobs", "default_chunk_size"]

# Budget for the (chunk x V) fp32 slab that each pass allocates once and reuses for every
# chunk (logits, turned in place into probabilities / the logit gradient). Alive at once, at
# most: the slab, one slab-sized temporary for the entropy (forward, only when asked), and a
# half-size bf16/fp16 copy (matmul output / gradient operand) for 2-byte inputs. 64 MiB per
# slab so bounds the working set at ~160 MiB, inside a 256 MB budget for chunk x V fp32.
# Example: V=32000 -> 524 tokens per chunk; V=151936 -> 110 tokens, still (110 x H) @ (H x V)
# matmuls large enough to run at full BLAS speed.
CHUNK_BYTES = 64 * 1024 * 1024


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk such that one fp32 (chunk x vocab_size) slab is <= CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _chunk_logits(hidden, weight, bias, temperature, out):
    """(c, H) -> (c, V) tempered logits written into `out`, a (c, V) view of the reused slab
    (accumulation dtype), with reference.py's op order: matmul in the input dtype, then
    upcast, bias, temperature."""
    if out.dtype == weight.dtype:
        torch.mm(hidden, weight.T, out=out)
    else:
        out.copy_(hidden @ weight.T)
    if bias is not None:
        out += bias.to(out.dtype)
    if temperature != 1.0:
        out /= temperature
    return out


def _chunks(n_active: int, chunk: int, rows: torch.Tensor | None):
    """Yields row selectors: slices (views, no copy) when every token is active, index
    tensors into the active tokens otherwise."""
    for start in range(0, n_active, chunk):
        stop = min(start + chunk, n_active)
        yield slice(start, stop) if rows is None else rows[start:stop]


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weight, temperature, return_entropy, chunk):
        n_tokens = hidden.shape[0]
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        rows = None if token_weight is None else torch.nonzero(token_weight).squeeze(1)
        n_active = n_tokens if rows is None else rows.numel()
        logp = hidden.new_zeros(n_tokens, dtype=acc_dtype)
        lse = hidden.new_zeros(n_tokens, dtype=acc_dtype)
        entropy = hidden.new_zeros(n_tokens if return_entropy else 0, dtype=acc_dtype)
        # One slab reused by every chunk: a fresh 64 MiB tensor per chunk would be a fresh
        # mmap, and its page faults cost as much as an elementwise pass over it.
        slab = hidden.new_empty((min(chunk, n_active), weight.shape[0]), dtype=acc_dtype)
        for sel in _chunks(n_active, chunk, rows):
            h = hidden[sel]
            logits = _chunk_logits(h, weight, bias, temperature, slab[: h.shape[0]])
            target_logit = logits.gather(1, targets[sel].unsqueeze(1)).squeeze(1)
            top = logits.amax(1, keepdim=True)
            shifted = logits.sub_(top)  # y = z - max <= 0, in place
            if return_entropy:
                # H = log S - sum e^y y / S with S = sum e^y: every term is O(1) even for
                # |z| ~ 1e4, where the textbook lse - sum p z cancels two ~1e4 numbers.
                weighted = torch.exp(shifted).mul_(shifted).sum(1)
            total = shifted.exp_().sum(1)
            log_total = total.log()
            chunk_lse = top.squeeze(1) + log_total
            lse[sel] = chunk_lse
            logp[sel] = target_logit - chunk_lse
            if return_entropy:
                entropy[sel] = log_total - weighted / total
        if token_weight is not None:
            logp = logp * token_weight
        ctx.save_for_backward(hidden, weight, bias, targets, token_weight, lse, rows)
        ctx.temperature = temperature
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, token_weight, lse, rows = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc_dtype = lse.dtype
        # Fold the token weight and d(logit)/d(raw logit) = 1/T into one per-token scale g:
        # d logp_n / d raw_logit_{n,v} = (onehot(target_n)_v - p_{n,v}) / T.
        g = grad_logp.to(acc_dtype) / ctx.temperature
        if token_weight is not None:
            g = g * token_weight
        n_active = hidden.shape[0] if rows is None else rows.numel()
        grad_hidden = hidden.new_zeros(hidden.shape) if need_hidden else None
        # Frozen LM head (LoRA): no V x H buffer at all. Otherwise accumulate across chunks
        # in fp32 so bf16 weights do not round once per chunk.
        grad_weight = weight.new_zeros(weight.shape, dtype=acc_dtype) if need_weight else None
        grad_bias = bias.new_zeros(bias.shape, dtype=acc_dtype) if need_bias else None
        slab = hidden.new_empty((min(ctx.chunk, n_active), weight.shape[0]), dtype=acc_dtype)
        for sel in _chunks(n_active, ctx.chunk, rows):
            h = hidden[sel]
            g_c = g[sel]
            logits = _chunk_logits(h, weight, bias, ctx.temperature, slab[: h.shape[0]])
            # In place: logits -> p -> -g p -> g (onehot - p), a single (c x V) slab.
            grad_logits = logits.sub_(lse[sel].unsqueeze(1)).exp_().mul_(-g_c.unsqueeze(1))
            grad_logits.scatter_add_(1, targets[sel].unsqueeze(1), g_c.unsqueeze(1))
            if need_bias:
                grad_bias += grad_logits.sum(0)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, h.to(acc_dtype))
            if need_hidden:
                if rows is None:  # contiguous rows: write the matmul straight into place
                    torch.mm(grad_logits.to(weight.dtype), weight, out=grad_hidden[sel])
                else:
                    grad_hidden[sel] = grad_logits.to(weight.dtype) @ weight
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
):
    """Token log-probs (and entropies) computed `chunk_size` tokens at a time.

    hidden (N, H) and weight (V, H) of one floating dtype, targets (N,) int64 in [0, V),
    bias (V,) or None, token_weight (N,) float or None (tokens with weight 0 are skipped).
    Returns (logp (N,), entropy (N,) or None), both fp32 (fp64 for fp64 weights): logp is
    multiplied by token_weight and differentiable w.r.t. hidden, weight and bias; entropy is
    detached and 0 for skipped tokens. Inputs are assumed valid (the dispatcher checks them).
    """
    chunk = default_chunk_size(weight.shape[0]) if chunk_size is None else chunk_size
    logp, entropy = _ChunkedLogprobs.apply(
        hidden, weight, bias, targets.long(), token_weight, temperature, return_entropy, chunk
    )
    return logp, (entropy if return_entropy else None)
