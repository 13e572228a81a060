"""Padding-free packed log-prob forwards (`token_logprobs(..., packed=True)`) against the padded
forward on the shipped tiny Llama with a LoRA adapter: log-probs, entropies and LoRA gradients,
for rollout-shaped batches (left-padded prompts, right-padded completions, explicit positions)
and right-padded batches without position_ids, under SDPA and eager attention (transformers
finds the packed sequences from the restarting position_ids) and under a FlashAttention-2
stand-in: flash_attn needs CUDA, so the test registers a pure-PyTorch varlen attention under
that name, which honours only the cu_seq_lens boundaries `token_logprobs` passes (it raises
without them), so the packed path's FlashAttention-2 plumbing runs on CPU.

    pytest tests/test_packing.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from grpo_fast import logprobs

ATOL = 1e-5


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """Causal attention within each cu_seq_lens_q segment of a (1, heads, total, dim) row, in
    flash_attention_forward's calling convention (returns (1, total, heads, dim), None)."""
    assert attention_mask is None and query.size(0) == 1
    bounds = kwargs["cu_seq_lens_q"].tolist()
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == max(b - a for a, b in zip(bounds, bounds[1:]))
    outputs = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                              is_causal=True, scale=scaling)
               for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outputs, dim=2).transpose(1, 2), None


@pytest.fixture(scope="module")
def model(tiny_lora_model):
    return tiny_lora_model


@pytest.fixture
def attention(model, request, monkeypatch):
    """Sets the model's attention implementation for one test."""
    if request.param == "flash_attention_2":
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", varlen_attention)
    monkeypatch.setattr(model.config, "_attn_implementation", request.param)
    return request.param


def rollout_batch(seed: int):
    """Rollout-shaped (5, P + C) batch: prompts of 2-6 tokens left-padded to P = 6, completions
    of 1-7 tokens right-padded to C = 7 (one row at each extreme), positions counted from each
    row's first real token, as `grpo_fast.rollout.Rollout` builds them."""
    g = torch.Generator().manual_seed(seed)
    prompt_lengths, completion_lengths = [2, 6, 4, 3, 5], [7, 1, 4, 6, 2]
    P, C = max(prompt_lengths), max(completion_lengths)
    ids = torch.randint(0, 256, (5, P + C), generator=g)
    attention_mask = torch.zeros(5, P + C, dtype=torch.long)
    completion_mask = torch.zeros(5, P + C, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        attention_mask[row, P - p:P + c] = 1
        completion_mask[row, P:P + c] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, attention_mask, completion_mask, position_ids


def right_padded_batch(seed: int):
    """(4, 11) rows of 3-11 tokens, right-padded; the last 60% of each row is the completion.
    No position_ids: the padded forward's default arange is then each row's own count."""
    g = torch.Generator().manual_seed(seed)
    lengths = [11, 3, 8, 5]
    ids = torch.randint(0, 256, (4, max(lengths)), generator=g)
    attention_mask = torch.zeros_like(ids)
    completion_mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        attention_mask[row, :n] = 1
        completion_mask[row, n - max(1, 3 * n // 5):n] = 1
    return ids, attention_mask, completion_mask, None


BATCHES = {"rollout": rollout_batch, "right-padded": right_padded_batch}


def run(model, batch, packed: bool):
    """(logps, entropy, {LoRA parameter: gradient}) of a weighted sum of the log-probs."""
    ids, attention_mask, completion_mask, position_ids = batch
    model.zero_grad(set_to_none=True)
    logps, entropy = logprobs.token_logprobs(model, ids, attention_mask, completion_mask,
                                             backend="chunked", position_ids=position_ids,
                                             packed=packed)
    weights = torch.linspace(-1.0, 1.0, logps.numel()).view_as(logps)
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), entropy, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flash_attention_2"], indirect=True)
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_packed_matches_padded(model, attention, kind):
    batch = BATCHES[kind](seed=1)
    packed = run(model, batch, packed=True)
    # The padded reference always runs SDPA, which is what makes the FlashAttention-2 stand-in
    # a check of the boundaries token_logprobs passes, not of itself.
    model.config._attn_implementation = "sdpa"
    padded = run(model, batch, packed=False)

    completion = batch[2][:, 1:].bool()
    assert (packed[0] != 0).sum() == completion.sum()
    torch.testing.assert_close(packed[0], padded[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(packed[1], padded[1], atol=ATOL, rtol=0)
    assert not packed[0][~completion].any() and not packed[1][~completion].any()
    assert packed[2].keys() == padded[2].keys() and any("lora_A" in n for n in packed[2])
    for name, grad in packed[2].items():
        scale = padded[2][name].abs().max().clamp(min=1.0)
        torch.testing.assert_close(grad, padded[2][name], atol=ATOL * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize(("attention", "expect_packed"),
                         [("sdpa", False), ("eager", False), ("flash_attention_2", True)],
                         indirect=["attention"])
def test_auto_packs_under_flash_attention_only(model, attention, expect_packed, monkeypatch):
    calls = []
    real = logprobs.packed_hidden_states
    monkeypatch.setattr(logprobs, "packed_hidden_states", lambda m, b: calls.append(b) or real(m, b))
    ids, attention_mask, completion_mask, position_ids = rollout_batch(seed=2)
    with torch.no_grad():
        logprobs.token_logprobs(model, ids, attention_mask, completion_mask, backend="chunked",
                                position_ids=position_ids)
    assert bool(calls) == expect_packed


def test_pack_layout_and_boundaries():
    ids, attention_mask, _, position_ids = rollout_batch(seed=3)
    batch = logprobs.pack(ids, attention_mask, position_ids)
    lengths = attention_mask.sum(dim=1)
    assert batch.input_ids.shape == (1, int(lengths.sum()))
    torch.testing.assert_close(batch.input_ids[0], ids[attention_mask.bool()])
    # Every sequence's positions run 0 .. length-1, and each attended (b, t) maps to its column.
    expected_positions = torch.cat([torch.arange(int(n)) for n in lengths])
    torch.testing.assert_close(batch.position_ids[0], expected_positions)
    real = attention_mask.bool()
    torch.testing.assert_close(batch.input_ids[0, batch.index[real]], ids[real])
    assert (batch.index[~real] == -1).all()
    # The boundaries match what transformers would infer from the positions.
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch.position_ids)
    torch.testing.assert_close(batch.cu_seq_lens, cu_q)
    assert batch.cu_seq_lens.dtype == torch.int32 and batch.max_length == int(max_q)
    # Without position_ids the positions are counted from each row's first real token too.
    torch.testing.assert_close(logprobs.pack(ids, attention_mask).position_ids, batch.position_ids)


def test_pack_drops_empty_rows():
    ids = torch.arange(12).view(3, 4)
    attention_mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
    batch = logprobs.pack(ids, attention_mask)
    assert batch.cu_seq_lens.tolist() == [0, 2, 5]
    assert batch.input_ids.tolist() == [[2, 3, 8, 9, 10]]


@pytest.mark.parametrize("attention", ["sdpa"], indirect=True)
def test_packed_refuses_positions_sdpa_would_misread(model, attention):
    ids, attention_mask, completion_mask, _ = right_padded_batch(seed=4)
    # Each row continuing the previous row's count: one long sequence to mask detection.
    continuing = torch.arange(ids.numel()).view(ids.shape)
    with pytest.raises(ValueError, match="restart"):
        logprobs.token_logprobs(model, ids, attention_mask, completion_mask, backend="chunked",
                                position_ids=continuing, packed=True)


@pytest.mark.parametrize("attention", ["sdpa"], indirect=True)
def test_packed_refuses_completion_outside_attention(model, attention):
    ids, attention_mask, completion_mask, position_ids = rollout_batch(seed=5)
    completion_mask[0, -1] = 1  # a padding column of a row whose completion is shorter
    completion_mask[1, -1] = 1
    with pytest.raises(ValueError, match="attention_mask"):
        logprobs.token_logprobs(model, ids, attention_mask, completion_mask, backend="chunked",
                                position_ids=position_ids, packed=True)
