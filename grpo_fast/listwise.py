r"""The listwise KL loss of offline GRPO and its diagnostics, as pure tensor functions.

A batch holds ``B`` groups of up to ``K`` scored completions of the same prompt. ``s`` is the
policy's sequence log-probability, ``score`` the external score, ``m`` the validity mask; the
softmaxes run over the valid completions of each group only::

    p = softmax(s / policy_temperature)          (policy distribution over the group)
    q = softmax(score / score_temperature)       (target distribution, no gradient)
    forward:  KL(q || p) = sum_k q_k (log q_k - log p_k)
    reverse:  KL(p || q) = sum_k p_k (log p_k - log q_k)
    loss = mean over groups with >= 2 valid completions

``listwise_kl_loss`` returns that loss, ``listwise_metrics`` the matching diagnostics (Python
floats). Terms whose weight (q_k forward, p_k reverse) is exactly 0 contribute exactly 0, value
and gradient, even where the other log-probability is -inf. Scores with
``|score / score_temperature| <= MAX_SCALED_SCORE`` keep the loss and its gradient finite in
float32. Nothing here knows about models or the trainer (grpo_fast.offline calls it). Usage::

    loss = listwise_kl_loss(seq_logps, scores, group_mask, score_temperature=0.5)
    metrics = listwise_metrics(seq_logps.detach(), scores, group_mask, score_temperature=0.5)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DIRECTIONS", "MAX_SCALED_SCORE", "listwise_kl_loss", "listwise_metrics"]

DIRECTIONS = ("forward", "reverse")
# The largest |score / score_temperature| the listwise loss takes in float32 (data validation
# enforces it). A quarter of float32's range: differences of two such values (the log-softmax
# subtracts the group's maximum) stay within half of it, so a group's KL (at most that, in the
# reverse direction) and its gradient with respect to the policy's logits stay finite.
MAX_SCALED_SCORE = torch.finfo(torch.float32).max / 4


def _masked_log_softmax(x: Tensor, mask: Tensor) -> Tensor:
    """log_softmax over the valid entries of each row; masked entries come out very negative.

    The fill is the dtype's most negative finite value, not -inf: a fully masked row then stays
    finite (uniform) instead of turning into NaN, and exp() of a masked entry is exactly 0 so it
    takes no part in the normalizer. Callers must still zero masked terms with ``torch.where``.
    """
    return x.masked_fill(~mask, torch.finfo(x.dtype).min).log_softmax(dim=-1)


def _listwise_parts(
    seq_logps: Tensor,
    scores: Tensor,
    group_mask: Tensor,
    policy_temperature: float,
    score_temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log_p, log_q, mask, eligible groups) shared by the loss and its metrics."""
    if seq_logps.dim() != 2 or seq_logps.shape != scores.shape or seq_logps.shape != group_mask.shape:
        raise ValueError(
            "seq_logps, scores and group_mask must all be (B, K); got "
            f"{tuple(seq_logps.shape)}, {tuple(scores.shape)}, {tuple(group_mask.shape)}"
        )
    if policy_temperature <= 0 or score_temperature <= 0:
        raise ValueError(
            f"temperatures must be > 0, got policy_temperature={policy_temperature}, "
            f"score_temperature={score_temperature}"
        )
    # Softmax over a handful of entries is cheap; do it in at least fp32 so bf16 inputs stay exact enough.
    dtype = torch.promote_types(seq_logps.dtype, torch.float32)
    mask = group_mask.bool()
    log_p = _masked_log_softmax(seq_logps.to(dtype) / policy_temperature, mask)
    log_q = _masked_log_softmax(scores.detach().to(dtype) / score_temperature, mask)
    eligible = mask.sum(dim=-1) >= 2  # a single completion gives a one-point distribution: KL is 0
    return log_p, log_q, mask, eligible


def _kl_terms(log_w: Tensor, log_other: Tensor, mask: Tensor) -> Tensor:
    """w * (log w - log other) per entry, with w = exp(log_w); exactly 0 where masked or w == 0.

    Both ``torch.where``s matter: a product would give 0 * -inf = NaN where log_w (or log_other)
    is -inf, in the value, and in the gradient even when the value is selected away."""
    w = log_w.exp()
    keep = mask & (w > 0)
    return torch.where(keep, w * torch.where(keep, log_w - log_other, 0.0), 0.0)


def _group_mean(per_group: Tensor, eligible: Tensor) -> Tensor:
    """Mean over eligible groups; 0 (still attached to the graph) when there are none.

    Divided before the sum: a reverse-KL group can be as large as MAX_SCALED_SCORE * 2, and a sum
    of several such groups would overflow."""
    return (torch.where(eligible, per_group, 0.0) / eligible.sum().clamp(min=1)).sum()


def listwise_kl_loss(
    seq_logps: Tensor,
    scores: Tensor,
    group_mask: Tensor,
    *,
    policy_temperature: float = 1.0,
    score_temperature: float = 1.0,
    direction: str = "forward",
) -> Tensor:
    """Listwise KL between the scores' and the policy's distributions over each group.

    Args:
        seq_logps: (B, K) policy log-probability of each completion (sum over its tokens).
        scores: (B, K) external score of each completion; treated as a constant.
        group_mask: (B, K) bool, True where the completion exists.
        policy_temperature: divides ``seq_logps`` before the softmax.
        score_temperature: divides ``scores`` before the softmax.
        direction: ``"forward"`` for KL(q || p) (mass-covering, what
            ``F.kl_div(log_p, log_q, log_target=True)`` computes) or ``"reverse"`` for KL(p || q)
            (mode-seeking).

    Returns:
        Scalar loss: with p = softmax(seq_logps / policy_temperature) and
        q = softmax(scores / score_temperature) over each group's valid completions,
        ``sum_k q_k (log q_k - log p_k)`` (forward) or ``sum_k p_k (log p_k - log q_k)`` (reverse),
        averaged over groups with at least 2 valid completions. Masked completions, and terms
        whose weight (q_k, or p_k for reverse) is exactly 0, contribute exactly zero, value and
        gradient. With no eligible group the loss is 0 and still backpropagates (zero
        gradients), so a degenerate micro-batch does not break the step.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    log_p, log_q, mask, eligible = _listwise_parts(
        seq_logps, scores, group_mask, policy_temperature, score_temperature
    )
    log_w, log_other = (log_q, log_p) if direction == "forward" else (log_p, log_q)
    return _group_mean(_kl_terms(log_w, log_other, mask).sum(dim=-1), eligible)


@torch.no_grad()
def listwise_metrics(
    seq_logps: Tensor,
    scores: Tensor,
    group_mask: Tensor,
    *,
    policy_temperature: float = 1.0,
    score_temperature: float = 1.0,
) -> dict[str, float]:
    """Diagnostics for the listwise loss, as Python floats (one host sync for all of them).

    Computed over the groups the loss uses (at least 2 valid completions); every value is NaN
    when there is no such group, and ``pairwise_accuracy`` is NaN when no pair has distinct scores.

    Returns:
        ``entropy``: mean over groups of H(p) = -sum_k p_k log p_k (collapse shows up as 0).
        ``kl``: mean forward KL(q || p), the forward loss value.
        ``pairwise_accuracy``: over all within-group pairs (i, j) with score_i != score_j, the
            fraction with sign(s_i - s_j) == sign(score_i - score_j) (pooled over the batch;
            a tie in ``seq_logps`` counts as wrong).
        ``top1_score``: mean over groups of the score of the completion with the highest seq_logp.
    """
    log_p, log_q, mask, eligible = _listwise_parts(
        seq_logps, scores, group_mask, policy_temperature, score_temperature
    )
    nan = torch.tensor(float("nan"), dtype=log_p.dtype, device=log_p.device)
    n_groups = eligible.sum()

    def group_mean(per_group: Tensor) -> Tensor:
        return torch.where(n_groups > 0, _group_mean(per_group.to(log_p.dtype), eligible), nan)

    p = log_p.exp()
    entropy = -torch.where(mask, p * log_p, 0.0).sum(dim=-1)
    kl = _kl_terms(log_q, log_p, mask).sum(dim=-1)

    best = seq_logps.masked_fill(~mask, float("-inf")).argmax(dim=-1, keepdim=True)
    top1 = scores.gather(-1, best).squeeze(-1)

    # (B, K, K) pair tables: groups are small, so this stays tiny.
    pair_valid = (mask.unsqueeze(-1) & mask.unsqueeze(-2) & eligible[:, None, None]).triu(diagonal=1)
    score_sign = (scores.unsqueeze(-1) - scores.unsqueeze(-2)).sign()
    logp_sign = (seq_logps.unsqueeze(-1) - seq_logps.unsqueeze(-2)).sign()
    pair_valid &= score_sign != 0
    n_pairs = pair_valid.sum()
    agree = (pair_valid & (logp_sign == score_sign)).sum()
    pairwise = torch.where(n_pairs > 0, agree.to(log_p.dtype) / n_pairs.clamp(min=1), nan)

    values = torch.stack([group_mean(entropy), group_mean(kl), pairwise, group_mean(top1)]).tolist()
    return dict(zip(("entropy", "kl", "pairwise_accuracy", "top1_score"), values))
