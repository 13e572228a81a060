"""The shared-prompt log-prob forward (`logprobs.shared_prompt_logprobs`: each distinct prompt
run once, its KV cache gathered out to its completions) against the plain padded forward of
the concatenated rows, on the shipped tiny Llama with a LoRA adapter: log-probs, entropies and
every LoRA gradient, for rollout-shaped groups (left-padded prompts of different lengths, G
completions each, of different lengths, some ending early), a row subset that leaves groups of
unequal size (what `informative_rows` passes), single-token completions, and the reference pass
with the adapter disabled; then the trainer's dispatch between the two forwards.

    pytest tests/test_shared_prompt.py
"""

from __future__ import annotations

import pytest
import torch

from grpo_fast import logprobs
from grpo_fast.logprobs import completion_logps, reference_logps
from grpo_fast.rollout import Rollout

ATOL = 1e-5


@pytest.fixture(scope="module")
def model(tiny_lora_model):
    return tiny_lora_model


def group_rollout(seed: int, prompt_lengths=(3, 6, 1), completion_lengths=(5, 2, 7, 1, 4, 7, 3, 6, 2),
                  G: int = 3) -> Rollout:
    """B = len(prompt_lengths) prompts left-padded to P, each repeated on G adjacent rows, with
    completions of the given lengths right-padded to C (pad id 0 after each row's end)."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(prompt_lengths), len(completion_lengths)
    assert N == B * G
    P, C = max(prompt_lengths), max(completion_lengths)
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompt_lengths):
        prompt_ids[b, P - p:] = torch.randint(1, 256, (p,), generator=g)
        prompt_mask[b, P - p:] = 1
    completion_ids = torch.zeros(N, C, dtype=torch.long)
    completion_mask = torch.zeros(N, C, dtype=torch.long)
    for row, c in enumerate(completion_lengths):
        completion_ids[row, :c] = torch.randint(1, 256, (c,), generator=g)
        completion_mask[row, :c] = 1
    lengths = completion_mask.sum(dim=1)
    return Rollout(prompt_ids=prompt_ids.repeat_interleave(G, dim=0),
                   prompt_mask=prompt_mask.repeat_interleave(G, dim=0),
                   completion_ids=completion_ids, completion_mask=completion_mask,
                   texts=[""] * N, terminated=lengths < C, lengths=lengths)


def run(model, roll: Rollout, shared: bool):
    """(logps, entropy, {LoRA parameter: gradient}) of a weighted sum of the (N, C) log-probs."""
    model.zero_grad(set_to_none=True)
    logps, entropy = completion_logps(model, roll, backend="chunked", shared_prompt=shared)
    weights = torch.linspace(-1.0, 1.0, logps.numel()).view_as(logps)
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), entropy, grads


def assert_same(shared, plain, completion_mask):
    mask = completion_mask.bool()
    assert (shared[0] != 0).sum() == mask.sum()
    assert not shared[0][~mask].any() and not shared[1][~mask].any()
    torch.testing.assert_close(shared[0], plain[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(shared[1], plain[1], atol=ATOL, rtol=0)
    assert shared[2].keys() == plain[2].keys() and any("lora_A" in n for n in shared[2])
    for name, grad in shared[2].items():
        scale = plain[2][name].abs().max().clamp(min=1.0)
        torch.testing.assert_close(grad, plain[2][name], atol=ATOL * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rows", [None, [0, 2, 3, 8], [4]], ids=["all", "unequal-groups", "one-row"])
def test_shared_prompt_matches_plain_forward(model, rows):
    roll = group_rollout(seed=1)
    if rows is not None:
        roll = roll.select(torch.tensor(rows))
    assert_same(run(model, roll, shared=True), run(model, roll, shared=False), roll.completion_mask)


def test_single_token_completions(model):
    roll = group_rollout(seed=2, prompt_lengths=(4, 2), completion_lengths=(1, 1, 1, 1), G=2)
    assert roll.completion_ids.size(1) == 1
    assert_same(run(model, roll, shared=True), run(model, roll, shared=False), roll.completion_mask)


def test_identical_prompts_are_run_once(model, monkeypatch):
    """Two rollout prompts with the same tokens are one distinct prompt: the first decoder call
    sees 2 rows for 3 prompts (two of them equal) x 2 completions."""
    roll = group_rollout(seed=3, prompt_lengths=(3, 5, 5), completion_lengths=(2,) * 6, G=2)
    roll.prompt_ids[4:] = roll.prompt_ids[2:4]
    decoder = model.get_decoder()
    shapes = []
    real_forward = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda **kw: shapes.append(kw["input_ids"].shape) or real_forward(**kw))
    with torch.no_grad():
        logprobs.shared_prompt_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.completion_ids,
                                        roll.completion_mask, backend="chunked")
    assert shapes == [(2, 5), (6, 1)]


def test_reference_pass_with_adapter_disabled(model):
    roll = group_rollout(seed=4)
    with torch.no_grad():
        shared = reference_logps(model, None, roll, backend="chunked", shared_prompt=True)
        plain = reference_logps(model, None, roll, backend="chunked", shared_prompt=False)
        adapted = completion_logps(model, roll, backend="chunked", shared_prompt=True)[0]
    torch.testing.assert_close(shared, plain, atol=ATOL, rtol=0)
    # The adapter (lora_B non-zero) does change the log-probs: the reference really is the base.
    assert (shared - adapted).abs().max() > 1e-3


def test_gradient_checkpointing_falls_back_to_plain_forward(model, monkeypatch):
    """HF turns the KV cache off under gradient checkpointing; the dispatch then runs the plain
    forward, whatever shared_prompt says."""
    calls = []
    real = logprobs.shared_prompt_logprobs
    monkeypatch.setattr(logprobs, "shared_prompt_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    roll = group_rollout(seed=5)
    model.activation_checkpointing_enable()
    try:
        with torch.no_grad():
            completion_logps(model, roll, backend="chunked", shared_prompt=True)
    finally:
        model.activation_checkpointing_disable()
    assert calls == []
    with torch.no_grad():
        completion_logps(model, roll, backend="chunked", shared_prompt=True)
    assert calls == [1]


def offline_batch(seed: int, truncate: bool = False) -> dict:
    """GroupCollator's layout for 2 groups (K = 3 and 2) of right-padded prompt + completion
    rows, prompts of 4 and 7 tokens; `truncate` cuts one row's prompt away entirely, as
    tokenize_group's left truncation does to a completion longer than max_seq_length."""
    g = torch.Generator().manual_seed(seed)
    groups = [(4, [3, 6, 1]), (7, [5, 2])]
    B, K, T = 2, 3, 13
    batch = {"input_ids": torch.zeros(B, K, T, dtype=torch.long),
             "attention_mask": torch.zeros(B, K, T, dtype=torch.long),
             "completion_mask": torch.zeros(B, K, T, dtype=torch.long),
             "group_mask": torch.zeros(B, K, dtype=torch.bool)}
    for b, (p, completions) in enumerate(groups):
        prompt = torch.randint(1, 256, (p,), generator=g)
        for k, c in enumerate(completions):
            batch["input_ids"][b, k, :p + c] = torch.cat([prompt, torch.randint(1, 256, (c,), generator=g)])
            batch["attention_mask"][b, k, :p + c] = 1
            batch["completion_mask"][b, k, p:p + c] = 1
            batch["group_mask"][b, k] = True
    if truncate:
        batch["completion_mask"][1, 0, :5] = 1          # a completion filling the whole row
    return batch


@pytest.mark.parametrize("normalize", [False, True], ids=["sum", "mean"])
def test_offline_group_logprobs_shared_matches_plain(model, normalize):
    batch = offline_batch(seed=6)
    results = []
    for shared in (True, False):
        model.zero_grad(set_to_none=True)
        seq = logprobs.group_logprobs(model, batch, normalize=normalize, backend="chunked",
                                      shared_prompt=shared)                      # (B, K)
        (seq * torch.tensor([[1.0, -0.5, 2.0], [0.3, 1.5, 0.0]])).sum().backward()
        results.append((seq.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                       if p.requires_grad}))
    (shared_seq, shared_grads), (plain_seq, plain_grads) = results
    assert shared_seq[1, 2] == 0 and (shared_seq[batch["group_mask"]] != 0).all()
    torch.testing.assert_close(shared_seq, plain_seq, atol=ATOL, rtol=0)
    for name, grad in shared_grads.items():
        scale = plain_grads[name].abs().max().clamp(min=1.0)
        torch.testing.assert_close(grad, plain_grads[name], atol=ATOL * scale, rtol=1e-4, msg=name)


def test_split_rows_layout_and_truncated_prompt_fallback(model):
    batch = offline_batch(seed=7)
    sel = batch["group_mask"]
    ids, attn, comp = batch["input_ids"][sel], batch["attention_mask"][sel], batch["completion_mask"][sel]
    prompt_ids, prompt_mask, completion_ids, completion_mask = logprobs.split_rows(ids, attn, comp)
    assert prompt_ids.shape == (5, 7) and completion_ids.shape == (5, 6)
    assert prompt_mask.sum(dim=1).tolist() == [4, 4, 4, 7, 7] and prompt_mask[:, -1].all()
    assert completion_mask.sum(dim=1).tolist() == [3, 6, 1, 5, 2]
    # Put back together, the rows are the original tokens.
    for row in range(5):
        joined = torch.cat([prompt_ids[row][prompt_mask[row].bool()], completion_ids[row][completion_mask[row].bool()]])
        assert torch.equal(joined, ids[row][attn[row].bool()])
    truncated = offline_batch(seed=7, truncate=True)
    sel = truncated["group_mask"]
    assert logprobs.split_rows(truncated["input_ids"][sel], truncated["attention_mask"][sel],
                               truncated["completion_mask"][sel]) is None
    # group_logprobs then runs the plain forward.
    with torch.no_grad():
        shared = logprobs.group_logprobs(model, truncated, backend="chunked", shared_prompt=True)
        plain = logprobs.group_logprobs(model, truncated, backend="chunked", shared_prompt=False)
    assert torch.equal(shared, plain)
