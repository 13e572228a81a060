"""Per-token and per-sequence log-probs of an LM head without materializing the logits.

GRPO needs log pi(target | context) for every completion token, i.e.
`log_softmax(hidden @ lm_head.weight.T / temperature)[n, target[n]]`. Done naively that is an
(N tokens x V vocab) fp32 tensor: 10 GB at N=16384, V=151936, plus as much again for its
gradient. This package computes the same numbers with three interchangeable backends:

- ``"triton"``: one fused kernel pass (fused_logprobs.py); logits live only in registers.
  Runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` (slow, for tests).
- ``"chunked"``: pure PyTorch (chunked.py), a chunk of tokens at a time; for CPU.
- ``"naive"``: the full-logits reference (reference.py); for tests and benchmarks.

``backend="auto"`` picks triton for CUDA tensors when triton imports, chunked otherwise.
All backends are differentiable w.r.t. hidden, weight and bias and skip the gradient of
whatever does not require one (a frozen LM head under LoRA gets no V x H gradient buffer).

    from grpo_fast.kernels import sequence_logprobs
    seq_logp = sequence_logprobs(hidden, model.lm_head.weight, targets, mask)  # (B,)

Tests: ``pytest tests/test_kernels.py``; benchmarks: ``pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

import math
import os

import torch

from .reference import reference_sequence_logprobs, reference_token_logprobs

__all__ = [
    "BACKENDS",
    "token_logprobs",
    "sequence_logprobs",
    "reference_token_logprobs",
    "reference_sequence_logprobs",
]

BACKENDS = ("triton", "chunked", "naive")

# The fused kernel's tl.dot takes these; fp64 goes to the chunked backend.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_triton_error: str | None = None
_triton_checked = False


def _triton_import_error() -> str | None:
    """None when the triton backend imports, else why not (checked once, lazily: importing
    triton costs ~1 s and the package must stay usable where triton is not installed)."""
    global _triton_error, _triton_checked
    if not _triton_checked:
        try:
            from . import fused_logprobs  # noqa: F401
        except ImportError as exc:
            _triton_error = f"{type(exc).__name__}: {exc}"
        _triton_checked = True
    return _triton_error


def _check_tensor(name: str, value, *, floating: bool = False) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if floating and not value.dtype.is_floating_point:
        raise ValueError(f"{name}: dtype must be floating point, got {value.dtype}")


def _validate(hidden, weight, targets, bias, mask, temperature, backend, token_dims: int) -> str:
    """Checks every argument (ValueError naming it) and returns the concrete backend."""
    _check_tensor("hidden", hidden, floating=True)
    if hidden.dim() != token_dims + 1:
        shape = "(N, H)" if token_dims == 1 else "(B, T, H)"
        raise ValueError(f"hidden: expected shape {shape}, got {tuple(hidden.shape)}")
    _check_tensor("weight", weight, floating=True)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (V, H), got {tuple(weight.shape)}")
    vocab, width = weight.shape
    if width != hidden.shape[-1]:
        raise ValueError(
            f"weight: hidden size {width} does not match hidden's {hidden.shape[-1]} "
            f"(weight {tuple(weight.shape)}, hidden {tuple(hidden.shape)})"
        )
    if vocab < 1:
        raise ValueError("weight: vocabulary size must be >= 1, got 0 rows")
    _check_tensor("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets: dtype must be an integer type, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dims), "
            f"got {tuple(targets.shape)}"
        )
    if mask is not None:
        _check_tensor("mask", mask)
        if tuple(mask.shape) != tuple(targets.shape):
            raise ValueError(
                f"mask: expected shape {tuple(targets.shape)} (same as targets), "
                f"got {tuple(mask.shape)}"
            )
    if bias is not None:
        _check_tensor("bias", bias, floating=True)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias: expected shape ({vocab},) (V), got {tuple(bias.shape)}")
    for name, tensor in (("weight", weight), ("targets", targets), ("bias", bias), ("mask", mask)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name}: on {tensor.device}, but hidden is on {hidden.device}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    if targets.numel():
        # Positions a mask ignores may hold anything (-100 padding labels are common).
        checked = targets if mask is None else targets[mask != 0]
        if checked.numel():
            low, high = torch.aminmax(checked)
            low, high = int(low), int(high)
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"targets: values must be in [0, V={vocab}), got min {low}, max {high}"
                )
    return _pick_backend(backend, hidden, weight)


def _pick_backend(backend, hidden, weight) -> str:
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend: must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if hidden.shape[:-1].numel() == 0:
        return "naive"  # no tokens: nothing to fuse, and no zero-sized kernel grids
    dtype = weight.dtype
    if backend == "auto":
        if hidden.is_cuda and dtype in _TRITON_DTYPES and _triton_import_error() is None:
            return "triton"
        return "chunked"
    if backend == "triton":
        error = _triton_import_error()
        if error is not None:
            raise ValueError(f"backend: 'triton' is unavailable ({error})")
        if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend: 'triton' needs CUDA tensors (hidden is on {hidden.device}); "
                "on CPU use 'chunked', or set TRITON_INTERPRET=1 before importing triton"
            )
        if dtype not in _TRITON_DTYPES:
            raise ValueError(
                f"backend: 'triton' supports weight dtypes {_TRITON_DTYPES}, got {dtype}; "
                "use 'chunked'"
            )
    return backend


def _run_fused(backend, hidden, weight, targets, bias, token_weight, temperature, return_entropy):
    """Runs a fused backend on flattened (N, H) tokens; returns (logp (N,), entropy or None),
    logp already multiplied by token_weight and entropy zeroed where token_weight == 0."""
    if backend == "triton":
        from .fused_logprobs import fused_logprobs as impl
    else:
        from .chunked import chunked_logprobs as impl
    return impl(
        hidden,
        weight,
        targets,
        bias=bias,
        token_weight=token_weight,
        temperature=float(temperature),
        return_entropy=return_entropy,
    )


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    return_entropy: bool = False,
):
    """Log-probs of `targets` under `log_softmax((hidden @ weight.T + bias) / temperature)`.

    hidden (N, H) float, weight (V, H) float (the LM head; hidden is cast to its dtype),
    targets (N,) integer in [0, V), bias (V,) or None.
    Returns logp (N,) float32 (float64 for float64 weights), differentiable w.r.t. hidden,
    weight and bias; with `return_entropy=True` the tuple (logp, entropy), entropy (N,)
    detached. Raises ValueError naming the offending argument.
    """
    name = _validate(hidden, weight, targets, bias, None, temperature, backend, token_dims=1)
    hidden = hidden.to(weight.dtype)
    if name == "naive":
        return reference_token_logprobs(
            hidden, weight, targets, temperature=temperature, bias=bias, return_entropy=return_entropy
        )
    logp, entropy = _run_fused(
        name, hidden, weight, targets, bias, None, temperature, return_entropy
    )
    return (logp, entropy) if return_entropy else logp


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    normalize: bool = False,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
    return_entropy: bool = False,
):
    """Masked per-sequence sum (mean with `normalize`) of token log-probs, in one kernel pass.

    hidden (B, T, H), weight (V, H), targets (B, T) integer, mask (B, T) bool or numeric:
    its entries weight the tokens (0 = ignored; ignored targets may be any value, e.g. -100).
    Returns seq_logp (B,) float32 (float64 for float64 weights); a fully masked row gives 0
    (and zero gradient), never NaN. With `return_entropy=True` the tuple
    (seq_logp, token_entropy (B, T)), entropy detached and 0 at ignored positions.
    Token blocks that are entirely masked cost no vocabulary work in the triton kernel.
    """
    name = _validate(hidden, weight, targets, bias, mask, temperature, backend, token_dims=2)
    hidden = hidden.to(weight.dtype)
    if name == "naive":
        return reference_sequence_logprobs(
            hidden,
            weight,
            targets,
            mask,
            temperature=temperature,
            normalize=normalize,
            bias=bias,
            return_entropy=return_entropy,
        )
    batch, seq_len, width = hidden.shape
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    token_weight = mask.reshape(-1).to(acc_dtype)
    safe_targets = torch.where(token_weight != 0, targets.reshape(-1).long(), 0)
    logp, entropy = _run_fused(
        name,
        hidden.reshape(batch * seq_len, width),
        weight,
        safe_targets,
        bias,
        token_weight,
        temperature,
        return_entropy,
    )
    # The tiny (B, T) -> (B,) reduction stays in PyTorch: deterministic (no float atomics),
    # and its backward broadcasts each row's gradient back to that row's tokens.
    seq = logp.view(batch, seq_len).sum(-1)
    if normalize:
        total = token_weight.view(batch, seq_len).sum(-1)
        seq = seq / torch.where(total != 0, total, torch.ones_like(total))
    if return_entropy:
        return seq, entropy.view(batch, seq_len)
    return seq
