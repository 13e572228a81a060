"""Log-prob kernels (grpo_fast.kernels) against the full-logits reference run in float64.

Every backend ("triton" under TRITON_INTERPRET=1 on CPU, "chunked", "naive") must match
`reference_*_logprobs` evaluated on float64 copies of the same inputs: values, entropies and
the gradients of hidden / weight / bias under a random upstream gradient. Shapes are tiny
because the Triton interpreter runs every program instance in Python.

    pytest tests/test_kernels.py                                # CPU, interpreter
    GRPO_FAST_TEST_CUDA=1 pytest tests/test_kernels.py          # same suite on the GPU
"""

from __future__ import annotations

import hashlib
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grpo_fast.kernels import (
    BACKENDS,
    chunked,
    reference_sequence_logprobs,
    reference_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)
from grpo_fast.kernels.fused_logprobs import fused_logprobs

_ON_CUDA = os.environ.get("GRPO_FAST_TEST_CUDA") == "1" and torch.cuda.is_available()

# (dtype, atol, rtol). atol scales with the largest magnitude of the reference tensor (when
# above 1): gradients of hidden, weight and bias differ in scale by orders of magnitude, and a
# bf16 gradient element is only as accurate as bf16 rounding of its largest peers.
FP32 = (torch.float32, 1e-6, 1e-5)
BF16 = (torch.bfloat16, 2e-2, 2e-2)

# Pairwise covering design over N x H x V x precision x temperature x bias x trainable weight:
# every pair of values of any two factors occurs in some row (16 rows instead of the 768 of
# the full product). Tails are covered by N=7/131, H=48/80 and V=31/257/1000, which are not
# multiples of any tile size; V=1 is the degenerate one-word vocabulary.
COVER = [
    (1, 16, 1, FP32, 1.0, True, False),
    (1, 48, 31, BF16, 0.7, True, True),
    (1, 80, 257, FP32, 1.0, True, False),
    (1, 16, 1000, BF16, 0.7, False, True),
    (7, 48, 1, BF16, 1.0, False, True),
    (7, 80, 31, FP32, 1.0, False, False),
    (7, 16, 257, BF16, 1.0, True, False),
    (7, 48, 1000, FP32, 0.7, True, False),
    (64, 80, 1, BF16, 1.0, False, True),
    (64, 16, 31, BF16, 1.0, True, False),
    (64, 48, 257, FP32, 0.7, False, True),
    (64, 80, 1000, BF16, 1.0, True, True),
    (131, 16, 1, BF16, 0.7, False, True),
    (131, 48, 31, FP32, 0.7, True, False),
    (131, 80, 257, BF16, 0.7, False, True),
    (131, 16, 1000, FP32, 1.0, True, True),
]
COVER_IDS = [
    f"N{n}-H{h}-V{v}-{str(p[0])[6:]}-T{t}-{'bias' if b else 'nobias'}-{'trainW' if w else 'frozenW'}"
    for n, h, v, p, t, b, w in COVER
]


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if _ON_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    """Fresh inputs per test, reproducible per test id."""
    digest = hashlib.sha256(request.node.nodeid.encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little"))


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Force several chunks at test sizes so the chunked backend's loop is exercised."""
    monkeypatch.setattr(chunked, "default_chunk_size", lambda vocab_size: 24)


def _make_inputs(n, h, v, dtype, device, *, with_bias, train_weight, logit_scale=2.0):
    """hidden (n, h), weight (v, h), bias (v,) or None, targets (n,) hitting 0 and v - 1.
    Logits have std ~logit_scale, peaked enough that probabilities span many decades."""
    hidden = torch.randn(n, h).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h) * logit_scale / h**0.5).to(device, dtype)
    weight.requires_grad_(train_weight)
    bias = torch.randn(v).to(device).requires_grad_() if with_bias else None
    targets = torch.randint(0, v, (n,))
    targets[0], targets[-1] = 0, v - 1
    return hidden, weight, bias, targets.to(device)


def _float64_leaves(*tensors):
    return [
        None if t is None else t.detach().double().requires_grad_(t.requires_grad)
        for t in tensors
    ]


def _assert_close(actual, expected, atol, rtol, what):
    expected = expected.detach().double().cpu()
    actual = actual.detach().double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(
        actual, expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def _grads(tensors):
    return [None if t is None or not t.requires_grad else t.grad for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v,precision,temperature,with_bias,train_weight", COVER, ids=COVER_IDS)
def test_token_logprobs_match_reference(
    backend, n, h, v, precision, temperature, with_bias, train_weight, device
):
    dtype, atol, rtol = precision
    hidden, weight, bias, targets = _make_inputs(
        n, h, v, dtype, device, with_bias=with_bias, train_weight=train_weight
    )
    logp, entropy = token_logprobs(
        hidden, weight, targets, temperature=temperature, bias=bias, backend=backend,
        return_entropy=True,
    )
    assert logp.shape == entropy.shape == (n,)
    assert logp.dtype == entropy.dtype == torch.float32
    assert not entropy.requires_grad
    upstream = torch.randn(n).to(device)
    (logp * upstream).sum().backward()

    ref_inputs = _float64_leaves(hidden, weight, bias)
    ref_logp, ref_entropy = reference_token_logprobs(
        ref_inputs[0], ref_inputs[1], targets, temperature=temperature, bias=ref_inputs[2],
        return_entropy=True,
    )
    (ref_logp * upstream.double()).sum().backward()

    _assert_close(logp, ref_logp, atol, rtol, "logp")
    _assert_close(entropy, ref_entropy, atol, rtol, "entropy")
    for name, got, want in zip(("hidden", "weight", "bias"), _grads([hidden, weight, bias]),
                               _grads(ref_inputs)):
        if want is not None:
            assert got is not None and got.dtype == {"bias": torch.float32}.get(name, dtype)
            _assert_close(got, want, atol, rtol, f"d{name}")
    if not train_weight:
        assert weight.grad is None


def _sequence_case(device, dtype, mask_kind):
    """B=6 rows of T=24 (N=144 tokens): rows 0 and 5 fully masked (row 5 alone fills the
    forward's second 128-token block and the backward's third 64-token block, so whole-block
    skipping runs), row 3 fully kept, the rest random; -100 targets where masked."""
    batch, seq_len, width, vocab = 6, 24, 48, 257
    hidden = torch.randn(batch, seq_len, width).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, width) * 2.0 / width**0.5).to(device, dtype).requires_grad_()
    bias = torch.randn(vocab).to(device).requires_grad_()
    keep = torch.rand(batch, seq_len) < 0.6
    keep[0], keep[5], keep[3] = False, False, True
    targets = torch.randint(0, vocab, (batch, seq_len))
    targets[3, 0], targets[3, -1] = 0, vocab - 1
    targets[~keep] = -100
    if mask_kind == "bool":
        mask = keep
    else:  # token weights, as a loss mask with per-token importance would be
        mask = keep * torch.rand(batch, seq_len).add(0.5)
    return hidden, weight, bias, targets.to(device), mask.to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "precision,normalize,temperature,mask_kind",
    [(FP32, False, 1.0, "bool"), (FP32, True, 0.7, "weights"), (BF16, True, 1.0, "bool")],
    ids=["fp32-sum-bool", "fp32-mean-weights", "bf16-mean-bool"],
)
def test_sequence_logprobs_match_reference(
    backend, precision, normalize, temperature, mask_kind, device
):
    dtype, atol, rtol = precision
    hidden, weight, bias, targets, mask = _sequence_case(device, dtype, mask_kind)
    seq, entropy = sequence_logprobs(
        hidden, weight, targets, mask, temperature=temperature, normalize=normalize, bias=bias,
        backend=backend, return_entropy=True,
    )
    assert seq.shape == (6,) and entropy.shape == (6, 24)
    assert seq.dtype == torch.float32 and not entropy.requires_grad
    upstream = torch.randn(6).to(device)
    (seq * upstream).sum().backward()

    ref_inputs = _float64_leaves(hidden, weight, bias)
    ref_seq, ref_entropy = reference_sequence_logprobs(
        ref_inputs[0], ref_inputs[1], targets, mask, temperature=temperature,
        normalize=normalize, bias=ref_inputs[2], return_entropy=True,
    )
    (ref_seq * upstream.double()).sum().backward()

    _assert_close(seq, ref_seq, atol, rtol, "seq_logp")
    _assert_close(entropy, ref_entropy, atol, rtol, "entropy")
    for name, got, want in zip(("hidden", "weight", "bias"), _grads([hidden, weight, bias]),
                               _grads(ref_inputs)):
        _assert_close(got, want, atol, rtol, f"d{name}")
    # Fully masked rows: exactly 0, no NaN from the mean's 0/0, and no gradient.
    assert seq[0].item() == 0.0 and seq[5].item() == 0.0
    assert (entropy[mask == 0] == 0).all()
    assert (hidden.grad[0] == 0).all() and (hidden.grad[5] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", [FP32, BF16], ids=["fp32", "bf16"])
def test_logits_of_magnitude_1e4_stay_finite(backend, precision, device):
    dtype, atol, rtol = precision
    vocab = 300
    hidden, weight, bias, targets = _make_inputs(
        33, 32, vocab, dtype, device, with_bias=True, train_weight=True, logit_scale=3e3
    )
    logits = hidden.detach().double() @ weight.detach().double().T
    assert 5e3 < logits.abs().max().item() < 5e4
    logp, entropy = token_logprobs(
        hidden, weight, targets, bias=bias, backend=backend, return_entropy=True
    )
    upstream = torch.randn(33).to(device)
    (logp * upstream).sum().backward()
    grads = _grads([hidden, weight, bias])
    for what, got in zip(("logp", "entropy", "dhidden", "dweight", "dbias"), [logp, entropy, *grads]):
        assert torch.isfinite(got).all(), what
    assert ((entropy >= 0) & (entropy <= math.log(vocab) + 1e-4)).all()

    ref_inputs = _float64_leaves(hidden, weight, bias)
    ref_logp, ref_entropy = reference_token_logprobs(
        ref_inputs[0], ref_inputs[1], targets, bias=ref_inputs[2], return_entropy=True
    )
    (ref_logp * upstream.double()).sum().backward()
    _assert_close(logp, ref_logp, atol, rtol, "logp")
    if dtype == torch.float32:
        # fp32 resolves a 1e4 logit to ~1e-3 and near-tied logits pass that on to p, so the
        # distribution-level outputs get tolerances of that size. (bf16 naive/chunked logits
        # are rounded to bf16, ~40 at 1e4: only their log-probs are comparable.)
        _assert_close(entropy, ref_entropy, 1e-3, 0.0, "entropy")
        for name, got, want in zip(("dhidden", "dweight", "dbias"), grads, _grads(ref_inputs)):
            _assert_close(got, want, 1e-2, 1e-2, name)


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_frozen_weight_gets_no_gradient_buffer(backend, device):
    """LoRA case: with a frozen LM head the backward must not allocate any V x H tensor."""
    vocab, width = 96, 32
    hidden, weight, bias, targets = _make_inputs(
        20, width, vocab, torch.float32, device, with_bias=True, train_weight=False
    )
    logp = token_logprobs(hidden, weight, targets, bias=bias, backend=backend)

    class _RecordVocabByHidden(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.allocations = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (
                    isinstance(t, torch.Tensor)
                    and tuple(t.shape) == (vocab, width)
                    and t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
                ):
                    self.allocations.append(func)
            return out

    with _RecordVocabByHidden() as recorder:
        logp.sum().backward()
    assert weight.grad is None
    assert hidden.grad is not None and bias.grad is not None
    assert recorder.allocations == []


def test_bf16_gradient_filtering(device):
    """Peaked bf16 distributions with sampled targets, as in RL. Filtering (the bf16 default)
    skips vocab tiles where every probability is < 2^-12, so more weight-gradient rows come
    out exactly 0 than without it, and both variants match the exact gradients within bf16
    tolerance."""
    _, atol, rtol = BF16
    hidden, weight, _, _ = _make_inputs(
        8, 32, 4096, torch.bfloat16, device, with_bias=False, train_weight=True,
        logit_scale=40.0,
    )
    logits = hidden.detach().float() @ weight.detach().float().T
    targets = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)
    upstream = torch.randn(8).to(device)
    ref_h, ref_w = _float64_leaves(hidden, weight)
    (reference_token_logprobs(ref_h, ref_w, targets) * upstream.double()).sum().backward()

    def grads(filter_eps):
        h, w = (t.detach().clone().requires_grad_() for t in (hidden, weight))
        logp, _ = fused_logprobs(h, w, targets, filter_eps=filter_eps)
        (logp * upstream).sum().backward()
        _assert_close(h.grad, ref_h.grad, atol, rtol, f"dhidden (filter_eps={filter_eps})")
        _assert_close(w.grad, ref_w.grad, atol, rtol, f"dweight (filter_eps={filter_eps})")
        return int((w.grad == 0).all(dim=1).sum())

    assert grads(None) > grads(0.0)


@pytest.mark.parametrize("backend", ["auto"] + list(BACKENDS))
def test_return_types(backend, device):
    hidden, weight, _, targets = _make_inputs(
        5, 16, 40, torch.float32, device, with_bias=False, train_weight=True
    )
    logp = token_logprobs(hidden, weight, targets, backend=backend)
    assert isinstance(logp, torch.Tensor) and logp.shape == (5,) and logp.requires_grad
    mask = torch.ones(1, 5, dtype=torch.bool, device=device)
    seq = sequence_logprobs(hidden[None], weight, targets[None], mask, backend=backend)
    assert isinstance(seq, torch.Tensor) and seq.shape == (1,)
    _assert_close(seq, logp.sum()[None], 1e-6, 1e-5, "seq vs token sum")


def _bad(**overrides):
    """Valid token_logprobs / sequence_logprobs arguments (V=1000, H=16), then overrides."""
    args = {
        "hidden": torch.randn(4, 16),
        "weight": torch.randn(1000, 16),
        "targets": torch.tensor([0, 5, 999, 3]),
        "temperature": 1.0,
        "bias": None,
        "backend": "chunked",
    }
    args.update(overrides)
    return args


VALIDATION_CASES = [
    ("token", _bad(hidden=torch.randn(2, 4, 16)), "hidden"),
    ("token", _bad(hidden=torch.ones(4, 16, dtype=torch.int64)), "hidden"),
    ("token", _bad(weight=torch.randn(1000, 17)), "weight"),
    ("token", _bad(weight=torch.randn(1000, 16, 1)), "weight"),
    ("token", _bad(weight=torch.ones(1000, 16, dtype=torch.int32)), "weight"),
    ("token", _bad(targets=torch.tensor([0, 1, 2])), "targets"),
    ("token", _bad(targets=torch.tensor([0.0, 1.0, 2.0, 3.0])), "targets"),
    ("token", _bad(targets=torch.tensor([0, 1, 1003, 3])), r"targets: values must be in \[0, V=1000\)"),
    ("token", _bad(targets=torch.tensor([0, -1, 2, 3])), "targets"),
    ("token", _bad(bias=torch.randn(999)), "bias"),
    ("token", _bad(temperature=0.0), "temperature"),
    ("token", _bad(temperature=-0.5), "temperature"),
    ("token", _bad(backend="cuda"), "backend"),
    ("sequence", _bad(hidden=torch.randn(4, 16), mask=torch.ones(4)), "hidden"),
    ("sequence", _bad(hidden=torch.randn(1, 4, 16), targets=torch.zeros(1, 4, dtype=torch.long),
                      mask=torch.ones(1, 5)), "mask"),
]


@pytest.mark.parametrize(
    "kind,args,argument", VALIDATION_CASES, ids=[f"{c[0]}-{i}-{c[2][:8]}" for i, c in
                                                 enumerate(VALIDATION_CASES)]
)
def test_validation_errors_name_the_argument(kind, args, argument):
    if kind == "token":
        fn = token_logprobs
    else:
        fn = sequence_logprobs
        args = dict(args)
        if args["targets"].dim() == 1 and args["hidden"].dim() == 3:
            args["targets"] = args["targets"][None]
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    positional = (hidden, weight, targets) + ((args.pop("mask"),) if kind == "sequence" else ())
    with pytest.raises(ValueError, match=f"^{argument}"):
        fn(*positional, **args)
