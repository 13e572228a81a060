"""Fused Triton token log-probs: LM-head matmul + online log-softmax + target gather.

The (N tokens x V vocab) logits are computed tile by tile in registers and never written to
memory; only per-token fp32 scalars (log-sum-exp, target logit, entropy) leave the kernel.
The backward recomputes each logit tile from the saved log-sum-exp and accumulates the
hidden, weight and bias gradients from it. Memory beyond inputs and gradients is O(N): at
N=16384, V=151936 the naive path holds 10 GB of fp32 logits (and as much again for their
gradient); this one holds 16 B per token per vocabulary split in the forward (a handful of
splits, see PROGRAMS_PER_SM), saves 4 B per token for the backward, and accumulates the
gradients in fp32 buffers (see `_backward`).

Layout, top to bottom: `@triton.jit` kernels, Python launchers, the autograd Function,
and the functional entry point `fused_logprobs`. Runs on CUDA, and on CPU under
TRITON_INTERPRET=1 (set before triton is imported; slow, for tests only):

    TRITON_INTERPRET=1 pytest tests/test_kernels.py -k triton

Normally reached through `grpo_fast.kernels.token_logprobs(..., backend="triton")`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["fused_logprobs"]

# Tile sizes for H100-class GPUs, bf16/fp16. Picked with ptxas (sm_90a, Triton 3.9), not by
# timing (there is no GPU in this repo's CI): the largest tiles for which both kernels, every
# feature flag on, compile without register spills at 8 warps. A 64 x 128 fp32 logit tile is
# 32 registers per thread, leaving room for the softmax epilogue's tile-sized temporaries and,
# in the backward, the bf16 logit-gradient operand and two (x BLOCK_H) fp32 products.
# 128-token tiles, or BLOCK_H=64, spilled 120-1300 bytes per thread.
BLOCK_N = 64
BLOCK_V = 128
# 32 x 2 B = 64 B per tile row per step: half a 128 B line, the other half is an L1/L2 hit at
# the next step.
BLOCK_H = 32
NUM_WARPS = 8
# Pipeline depth: a stage holds (64 + 128) x 32 operands, 12 KB in bf16, 24 KB in fp32.
NUM_STAGES_HALF = 3
NUM_STAGES_FP32 = 2
# tl.dot needs every dimension >= 16; tiny problems clamp their tiles down to this.
MIN_BLOCK = 16
# Forward grid: the vocabulary is split into contiguous ranges until there are about this
# many programs per SM, so small N (e.g. 4096 tokens = 64 token blocks) still fills an H100's
# 132 SMs. At ~255 registers x 256 threads one program is resident per SM, so 2 means two
# waves, which evens out programs that skip masked blocks. Each split writes its own
# partial log-sum-exp; they are merged in PyTorch.
PROGRAMS_PER_SM = 2
# Backward grid ordering: GROUP_N consecutive token blocks walk the vocabulary together, so
# programs resident at the same time share the same hidden rows and weight tiles in L2
# (8 x 64 tokens x 3584 x 2 B = 3.7 MB of hidden rows for a 7B model).
GROUP_N = 8
# Gradient filtering (CCE): a (token block x vocab tile) whose softmax probabilities are all
# below 2^-12 and that holds no target contributes below bf16/fp16 resolution (8-11 mantissa
# bits) relative to the target's gradient, so its two backward matmuls are skipped.
# Off for fp32 so fp32 gradients stay exact.
HALF_FILTER_EPS = 2.0**-12
# Stand-in for -inf as the initial running max: exp(-1e30 - m) is exactly 0 like exp(-inf),
# but (-1e30 - m) * 0 stays 0 where (-inf) * 0 would be NaN in the entropy update.
# (tl.constexpr: compiled kernels may only read constexpr globals.)
NEG_BIG = tl.constexpr(-1e30)
# Rough SM count used under the interpreter (no GPU to ask): small, so the tests' shapes
# still get several vocabulary splits and exercise the partial merge.
INTERPRETER_SMS = 4


# Addressing: program ids are cast to int64 and only the scalar tile base pointers
# (x + row0 * stride, w + col0 * stride) are formed in 64 bits, where N x H or V x H can pass
# 2^31. Offsets inside a tile (< 128 x H) stay int32: a 2-D int64 offset tile costs 2
# registers per element, and with them the bf16 forward tile spilled (ptxas, sm_90).


@triton.jit
def _logit_tile(
    x_tile, w_tile, bias_tile, n_mask, v_mask, width, stride_xn, stride_wv, inv_temperature,
    HAS_BIAS: tl.constexpr, UPCAST_FOR_INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """(BLOCK_N x BLOCK_V) fp32 tile of (x @ w.T + b) / T, -inf in the vocabulary tail.
    x_tile / w_tile / bias_tile point at the tile's first token row / vocab row / bias."""
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, width, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        h_mask = ks < width
        x = tl.load(x_tile + rows[:, None] * stride_xn + ks[None, :],
                    mask=n_mask[:, None] & h_mask[None, :], other=0.0)
        w = tl.load(w_tile + cols[:, None] * stride_wv + ks[None, :],
                    mask=v_mask[:, None] & h_mask[None, :], other=0.0)
        if UPCAST_FOR_INTERPRETER:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_tile + cols, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return tl.where(v_mask[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, tgt_ptr, tokw_ptr, part_ptr,
    n_tokens, vocab, width, stride_xn, stride_wv, inv_temperature, tiles_per_split, n_splits,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
    UPCAST_FOR_INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One token block x one vocabulary split: online log-sum-exp over its vocab tiles.

    Writes part[0..3, split, n] = running max m, sum_v exp(z - m), sum_v exp(z - m) (z - m)
    (the entropy numerator, kept relative to m so it never cancels two ~|z| numbers), and
    the target logit (0 unless the target falls in this split).
    """
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    row0 = pid_n * BLOCK_N
    offs_n = row0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_tokens
    x_tile = x_ptr + row0 * stride_xn
    tgt = tl.load(tgt_ptr + offs_n, mask=n_mask, other=-1)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, vocab)
    if HAS_MASK:
        tokw = tl.load(tokw_ptr + offs_n, mask=n_mask, other=0.0)
        # A fully masked token block (padding, prompt) runs an empty vocabulary loop.
        v_end = tl.where(tl.max(tl.abs(tokw), axis=0) > 0, v_end, v_begin)

    run_max = tl.full((BLOCK_N,), NEG_BIG, dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_ent = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tgt_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        v_mask = v0 + tl.arange(0, BLOCK_V) < vocab
        z = _logit_tile(x_tile, w_ptr + v0 * stride_wv, bias_ptr + v0, n_mask, v_mask, width,
                        stride_xn, stride_wv, inv_temperature, HAS_BIAS,
                        UPCAST_FOR_INTERPRETER, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        # The target's column inside this tile, int32 (never matches outside the tile).
        tgt_col = (tgt - v0).to(tl.int32)
        is_tgt = tl.arange(0, BLOCK_V)[None, :] == tgt_col[:, None]
        tgt_logit += tl.sum(tl.where(is_tgt, z, 0.0), axis=1)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        if RETURN_ENTROPY:
            # sum e^(z-m')(z-m') = e^(m-m') [sum e^(z-m)(z-m) + (m-m') sum e^(z-m)] + tile.
            shifted = tl.where(v_mask[None, :], z - new_max[:, None], 0.0)
            run_ent = rescale * (run_ent + (run_max - new_max) * run_sum) + tl.sum(p * shifted, axis=1)
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        run_max = new_max

    # A split that did no work (masked block) reports an empty but finite partial (m=0,
    # sum=1); every processed tile leaves run_sum >= 1 (its max term is exp(0)).
    idle = run_sum == 0.0
    run_max = tl.where(idle, 0.0, run_max)
    run_sum = tl.where(idle, 1.0, run_sum)
    plane = n_splits * n_tokens
    out = part_ptr + pid_s * n_tokens + offs_n
    tl.store(out, run_max, mask=n_mask)
    tl.store(out + plane, run_sum, mask=n_mask)
    if RETURN_ENTROPY:
        tl.store(out + 2 * plane, run_ent, mask=n_mask)
    tl.store(out + 3 * plane, tgt_logit, mask=n_mask)


@triton.jit
def _accumulate_grads(
    x_tile, w_tile, dx_tile, dw_tile, db_tile, dlogit, n_mask, v_mask, width,
    stride_xn, stride_wv,
    COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    UPCAST_FOR_INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dx[n] += dlogit @ w[v], dw[v] += dlogit.T @ x[n], db[v] += colsum(dlogit), in fp32;
    dx_tile / dw_tile / db_tile point at the tile's first row of the (contiguous) buffers."""
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    if COMPUTE_DB:
        tl.atomic_add(db_tile + cols, tl.sum(dlogit, axis=0), mask=v_mask, sem="relaxed")
    if UPCAST_FOR_INTERPRETER:
        dlogit_mm = dlogit
    else:
        # Tensor-core operands in the input dtype (bf16 products are exact in fp32 and the
        # accumulation stays fp32), as a bf16 matmul of the materialized gradient would do.
        dlogit_mm = dlogit.to(w_tile.dtype.element_ty)
    for h0 in range(0, width, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        h_mask = ks < width
        if COMPUTE_DX:
            w = tl.load(w_tile + cols[:, None] * stride_wv + ks[None, :],
                        mask=v_mask[:, None] & h_mask[None, :], other=0.0)
            if UPCAST_FOR_INTERPRETER:
                w = w.to(tl.float32)
            dx = tl.dot(dlogit_mm, w, input_precision=DOT_PRECISION)
            tl.atomic_add(dx_tile + rows[:, None] * width + ks[None, :], dx,
                          mask=n_mask[:, None] & h_mask[None, :], sem="relaxed")
        if COMPUTE_DW:
            x = tl.load(x_tile + rows[:, None] * stride_xn + ks[None, :],
                        mask=n_mask[:, None] & h_mask[None, :], other=0.0)
            if UPCAST_FOR_INTERPRETER:
                x = x.to(tl.float32)
            dw = tl.dot(tl.trans(dlogit_mm), x, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_tile + cols[:, None] * width + ks[None, :], dw,
                          mask=v_mask[:, None] & h_mask[None, :], sem="relaxed")


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, tgt_ptr, lse_ptr, g_ptr, dx_ptr, dw_ptr, db_ptr,
    n_tokens, vocab, width, stride_xn, stride_wv, inv_temperature, filter_eps,
    HAS_BIAS: tl.constexpr, COMPUTE_DX: tl.constexpr, COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr, FILTER: tl.constexpr,
    UPCAST_FOR_INTERPRETER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    """One (token block x vocab tile): recompute the logits, form
    dlogit = g_n (onehot(target_n) - p) with g_n = upstream_n * token_weight_n / T,
    and accumulate all three gradients from it."""
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.cdiv(n_tokens, BLOCK_N)
    v_tiles = tl.cdiv(vocab, BLOCK_V)
    # Grouped order: consecutive pids cover GROUP_N token blocks of one vocab tile, then
    # the next vocab tile (see GROUP_N).
    per_group = GROUP_N * v_tiles
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows

    row0 = pid_n * BLOCK_N
    offs_n = row0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_tokens
    g = tl.load(g_ptr + offs_n, mask=n_mask, other=0.0)
    # Token blocks with no upstream gradient (masked rows) skip everything.
    if tl.max(tl.abs(g), axis=0) > 0:
        col0 = pid_v * BLOCK_V
        v_mask = col0 + tl.arange(0, BLOCK_V) < vocab
        tgt = tl.load(tgt_ptr + offs_n, mask=n_mask, other=-1)
        # +inf for the token tail makes p exactly 0 there, whatever the bias.
        lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=float("inf"))
        x_tile = x_ptr + row0 * stride_xn
        w_tile = w_ptr + col0 * stride_wv
        z = _logit_tile(x_tile, w_tile, bias_ptr + col0, n_mask, v_mask, width, stride_xn,
                        stride_wv, inv_temperature, HAS_BIAS, UPCAST_FOR_INTERPRETER,
                        DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        p = tl.exp(z - lse[:, None])
        tgt_col = (tgt - col0).to(tl.int32)
        is_tgt = tl.arange(0, BLOCK_V)[None, :] == tgt_col[:, None]
        dlogit = g[:, None] * (is_tgt.to(tl.float32) - p)
        dx_tile = dx_ptr + row0 * width
        dw_tile = dw_ptr + col0 * width
        db_tile = db_ptr + col0
        if FILTER:
            if tl.max(tl.max(tl.where(is_tgt, 1.0, p), axis=1), axis=0) >= filter_eps:
                _accumulate_grads(x_tile, w_tile, dx_tile, dw_tile, db_tile, dlogit, n_mask,
                                  v_mask, width, stride_xn, stride_wv, COMPUTE_DX, COMPUTE_DW,
                                  COMPUTE_DB, UPCAST_FOR_INTERPRETER, DOT_PRECISION, BLOCK_N,
                                  BLOCK_V, BLOCK_H)
        else:
            _accumulate_grads(x_tile, w_tile, dx_tile, dw_tile, db_tile, dlogit, n_mask, v_mask,
                              width, stride_xn, stride_wv, COMPUTE_DX, COMPUTE_DW, COMPUTE_DB,
                              UPCAST_FOR_INTERPRETER, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda" or _interpreting():
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block(size: int, cap: int) -> int:
    """Tile size: the H100 default `cap`, shrunk to the problem, never below tl.dot's 16."""
    return min(cap, max(MIN_BLOCK, triton.next_power_of_2(size)))


def _kernel_flags(dtype: torch.dtype) -> dict:
    """Compile-time flags shared by both kernels."""
    # fp32 operands follow torch's matmul setting (TF32 off by default) so fp32 results match
    # a torch fp32 matmul; bf16/fp16 operands ignore the precision and keep Triton's default.
    ieee = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return {
        # The interpreter's tl.dot mishandles bf16 operands: compute those dots in fp32.
        "UPCAST_FOR_INTERPRETER": _interpreting(),
        "DOT_PRECISION": "ieee" if ieee else "tf32",
    }


def _launch_options(dtype: torch.dtype) -> dict:
    stages = NUM_STAGES_FP32 if dtype == torch.float32 else NUM_STAGES_HALF
    return {"num_warps": NUM_WARPS, "num_stages": stages}


def _forward(hidden, weight, bias, targets, token_weight, inv_temperature, return_entropy):
    """Launches the forward kernel and merges its vocabulary splits.

    Returns (logp (N,) fp32 multiplied by token_weight, lse (N,) fp32, entropy (N,) fp32 or
    None, 0 where token_weight is 0).
    """
    n_tokens, width = hidden.shape
    vocab = weight.shape[0]
    block_n = _block(n_tokens, BLOCK_N)
    block_v = _block(vocab, BLOCK_V)
    block_h = _block(width, BLOCK_H)
    n_blocks = triton.cdiv(n_tokens, block_n)
    v_tiles = triton.cdiv(vocab, block_v)
    splits = min(v_tiles, triton.cdiv(PROGRAMS_PER_SM * _num_sms(hidden.device), n_blocks))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)  # no split left without a tile
    # (max, sum, entropy numerator, target logit) x splits x N: 16 B per token per split.
    part = torch.empty((4, splits, n_tokens), dtype=torch.float32, device=hidden.device)
    _logprobs_fwd_kernel[(n_blocks, splits)](
        hidden, weight, weight if bias is None else bias, targets,
        hidden if token_weight is None else token_weight, part,
        n_tokens, vocab, width, hidden.stride(0), weight.stride(0), inv_temperature,
        tiles_per_split, splits,
        HAS_BIAS=bias is not None, HAS_MASK=token_weight is not None,
        RETURN_ENTROPY=return_entropy, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        **_kernel_flags(weight.dtype), **_launch_options(weight.dtype),
    )
    run_max, run_sum, run_ent, tgt_logit = part.unbind(0)
    # Merge splits s: lse = M + log sum_s sum_s e^(m_s - M), M = max_s m_s (O(splits x N)).
    top = run_max.amax(0)
    rescale = torch.exp(run_max - top)
    total = (run_sum * rescale).sum(0)
    log_total = torch.log(total)
    lse = top + log_total
    logp = tgt_logit.sum(0) - lse
    entropy = None
    if return_entropy:
        numerator = (rescale * (run_ent + (run_max - top) * run_sum)).sum(0)
        entropy = log_total - numerator / total
    if token_weight is not None:
        logp = logp * token_weight
        if entropy is not None:
            entropy = torch.where(token_weight != 0, entropy, 0.0)
    return logp, lse, entropy


def _backward(hidden, weight, bias, targets, lse, g, inv_temperature, filter_eps, needs):
    """Launches the backward kernel. `g` (N,) fp32 is upstream * token_weight / T.

    Gradients accumulate with fp32 atomics, one add per (token block, vocab tile) into each
    of dhidden (N x H), dweight (V x H) and dbias (V,). That keeps the logit tile computed
    once for all three products (a deterministic split into a dhidden kernel and a dweight
    kernel would recompute every tile twice, ~4/3 the FLOPs, and lose most of the gradient
    filtering win). The price is run-to-run differences in the last fp32 bits. For bf16/fp16
    inputs the fp32 accumulators are cast at the end (dweight: V x H x 4 B extra, 2.2 GB for
    V=151936, H=3584, only allocated when the LM head is trainable).
    """
    need_dx, need_dw, need_db = needs
    n_tokens, width = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    dx = torch.zeros((n_tokens, width), dtype=torch.float32, device=device) if need_dx else None
    dw = torch.zeros((vocab, width), dtype=torch.float32, device=device) if need_dw else None
    db = torch.zeros((vocab,), dtype=torch.float32, device=device) if need_db else None
    block_n = _block(n_tokens, BLOCK_N)
    block_v = _block(vocab, BLOCK_V)
    grid = (triton.cdiv(n_tokens, block_n) * triton.cdiv(vocab, block_v),)
    _logprobs_bwd_kernel[grid](
        hidden, weight, weight if bias is None else bias, targets, lse, g,
        g if dx is None else dx, g if dw is None else dw, g if db is None else db,
        n_tokens, vocab, width, hidden.stride(0), weight.stride(0), inv_temperature,
        filter_eps,
        HAS_BIAS=bias is not None, COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
        FILTER=filter_eps > 0, BLOCK_N=block_n, BLOCK_V=block_v,
        BLOCK_H=_block(width, BLOCK_H), GROUP_N=GROUP_N,
        **_kernel_flags(weight.dtype), **_launch_options(weight.dtype),
    )
    return (
        None if dx is None else dx.to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weight, temperature, return_entropy,
                filter_eps):
        inv_temperature = 1.0 / temperature
        logp, lse, entropy = _forward(
            hidden, weight, bias, targets, token_weight, inv_temperature, return_entropy
        )
        # Saved activations: the inputs (already alive in the caller) plus 4 B per token.
        ctx.save_for_backward(hidden, weight, bias, targets, token_weight, lse)
        ctx.inv_temperature = inv_temperature
        ctx.filter_eps = filter_eps
        if entropy is None:
            entropy = lse.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, token_weight, lse = ctx.saved_tensors
        g = grad_logp.float() * ctx.inv_temperature
        if token_weight is not None:
            g = g * token_weight
        # needs_input_grad is False for a frozen LM head: no V x H buffer, no dweight matmuls.
        dx, dw, db = _backward(
            hidden, weight, bias, targets, lse, g.contiguous(), ctx.inv_temperature,
            ctx.filter_eps, ctx.needs_input_grad[:3],
        )
        return dx, dw, db, None, None, None, None, None


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    token_weight: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    filter_eps: float | None = None,
):
    """Token log-probs of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    Shapes: hidden (N, H) and weight (V, H), both fp32, fp16 or bf16 of the same dtype;
    targets (N,) integer in [0, V); bias (V,) float or None; token_weight (N,) fp32 or None
    (per-token multiplier of the output; token blocks whose weights are all 0 are skipped).
    `filter_eps`: backward gradient-filtering threshold (None: 2^-12 for fp16/bf16, 0 = off
    for fp32).

    Returns (logp, entropy): logp (N,) fp32 = token_weight * log p(target), differentiable
    w.r.t. hidden, weight and bias (gradients only for those that require them); entropy
    (N,) fp32, detached, 0 where token_weight is 0, or None without `return_entropy`.
    Validation of values (target range, temperature) is the dispatcher's job.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H) / weight (V, H) expected, got "
                         f"{tuple(hidden.shape)} / {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or weight.dtype not in (torch.float32, torch.float16,
                                                            torch.bfloat16):
        raise ValueError(f"hidden/weight: need one of fp32/fp16/bf16, got "
                         f"{hidden.dtype}/{weight.dtype}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets: expected ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if filter_eps is None:
        filter_eps = 0.0 if weight.dtype == torch.float32 else HALF_FILTER_EPS
    if token_weight is not None:
        token_weight = token_weight.float().contiguous()
    logp, entropy = _FusedLogprobs.apply(
        hidden.contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), targets.long().contiguous(),
        token_weight, float(temperature), return_entropy, float(filter_eps),
    )
    return logp, (entropy if return_entropy else None)
