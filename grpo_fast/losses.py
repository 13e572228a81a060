r"""Pure loss functions for offline (listwise) and online (clipped-surrogate) GRPO.

Everything here takes tensors and returns tensors (plus a dict of Python floats for logging);
nothing knows about models, tokenizers or the trainer, so each formula is testable on its own.

Offline GRPO: listwise KL
-------------------------
A batch holds ``B`` groups of up to ``K`` scored completions of the same prompt. ``s`` is the
policy's sequence log-probability, ``score`` the external score, ``m`` the validity mask; the
softmaxes run over the valid completions of each group only::

    p = softmax(s / policy_temperature)          (policy distribution over the group)
    q = softmax(score / score_temperature)       (target distribution, no gradient)
    forward:  KL(q || p) = sum_k q_k (log q_k - log p_k)
    reverse:  KL(p || q) = sum_k p_k (log p_k - log q_k)
    loss = mean over groups with >= 2 valid completions

``listwise_kl_loss`` returns that loss, ``listwise_metrics`` the matching diagnostics. Terms whose
weight (q_k forward, p_k reverse) is exactly 0 contribute exactly 0, value and gradient, even where
the other log-probability is -inf. Scores with ``|score / score_temperature| <= MAX_SCALED_SCORE``
keep the loss and its gradient finite in float32.

Online GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1)
---------------------------------------------------------
``group_advantages`` turns the rewards of ``G`` sampled completions per prompt into
group-relative advantages::

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)      (std unbiased, as in TRL)

``grpo_loss`` is the clipped surrogate with an optional k3 KL penalty, per token ``t`` of
completion ``i``::

    rho  = exp(logp - logp_old)
    k3   = exp(logp_ref - logp) - (logp_ref - logp) - 1              (>= 0, 0 iff equal)
    l_it = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * k3

and a named reduction (``LOSS_TYPES``) turns the masked ``l_it`` into a scalar. Usage::

    adv = group_advantages(rewards, num_generations=8)
    loss, metrics = grpo_loss(logps, old_logps, ref_logps, adv, mask, loss_type="dapo",
                              num_items_in_batch=global_completion_tokens)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "LOSS_TYPES",
    "LossType",
    "MAX_SCALED_SCORE",
    "group_advantages",
    "grpo_loss",
    "listwise_kl_loss",
    "get_loss_type",
    "listwise_metrics",
    "register_loss_type",
    "zero_std_fraction",
]

# Added to the std before dividing, as in TRL, so advantages match TRL's to the last bit.
ADVANTAGE_EPS = 1e-4
SCALE_MODES = ("group", "batch", "none")
DIRECTIONS = ("forward", "reverse")
# The largest |score / score_temperature| the listwise loss takes in float32 (data validation
# enforces it). A quarter of float32's range: differences of two such values (the log-softmax
# subtracts the group's maximum) stay within half of it, so a group's KL (at most that, in the
# reverse direction) and its gradient with respect to the policy's logits stay finite.
MAX_SCALED_SCORE = torch.finfo(torch.float32).max / 4


# --------------------------------------------------------------------------------------------
# Offline GRPO: listwise KL between the policy's and the scores' distributions over a group
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Online GRPO: group-relative advantages
# --------------------------------------------------------------------------------------------


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    if num_generations < 1 or rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be 1-D with a length divisible by num_generations={num_generations}; "
            f"got shape {tuple(rewards.shape)}"
        )
    return rewards.reshape(-1, num_generations)


def _zero_std_groups(grouped: Tensor) -> Tensor:
    # Exact equality rather than std == 0: the std of equal floats can come out as a tiny
    # non-zero from rounding in the mean.
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def group_advantages(rewards: Tensor, num_generations: int, *, scale: str = "group") -> Tensor:
    """Group-relative advantages of GRPO (DeepSeekMath eq. for outcome supervision).

    Args:
        rewards: (B*G,) total reward per completion, each prompt's G completions adjacent.
        num_generations: G, completions per prompt.
        scale: how the centred reward is scaled:
            ``"group"``: A_i = (r_i - mean_g) / (std_g + 1e-4), std over the group (DeepSeekMath);
            ``"batch"``: A_i = (r_i - mean_g) / (std_batch + 1e-4), std over all B*G rewards
            (mean still per group), which keeps easy prompts from being up-weighted;
            ``"none"``: A_i = r_i - mean_g (Dr. GRPO, arXiv 2503.20783: no difficulty bias).
            std is unbiased (Bessel-corrected, ``torch.std``'s default) and 1e-4 is added as in
            TRL, so values match TRL's.

    Returns:
        (B*G,) advantages in the rewards' floating dtype. Groups whose rewards are all equal
        (including every group when G == 1, where the std is undefined) get exactly 0: they carry
        no learning signal, and this avoids 0/0 and rounding residue.
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"scale must be one of {SCALE_MODES}, got {scale!r}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = _grouped(rewards, num_generations)
    if num_generations == 1:
        # A lone completion has nothing to be compared with (and an undefined unbiased std).
        return torch.zeros_like(rewards)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        advantages = centred / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    elif scale == "batch":
        advantages = centred / (rewards.std() + ADVANTAGE_EPS)
    else:
        advantages = centred
    advantages = torch.where(_zero_std_groups(grouped).unsqueeze(1), 0.0, advantages)
    return advantages.view(-1)


def zero_std_fraction(rewards: Tensor, num_generations: int) -> float:
    """Fraction of groups whose G rewards are all equal (TRL logs it as ``frac_reward_zero_std``).

    Those groups get zero advantage, so this is the share of prompts that teach nothing this step.
    """
    grouped = _grouped(rewards, num_generations)
    return _zero_std_groups(grouped).float().mean().item()


# --------------------------------------------------------------------------------------------
# Online GRPO: clipped surrogate loss with named reductions
# --------------------------------------------------------------------------------------------

# A reduction maps (per_token_loss (N, T) already zeroed at padding, mask (N, T) bool,
# max_completion_length, num_items_in_batch) to the scalar loss.
Reduction = Callable[[Tensor, Tensor, int | None, int | Tensor | None], Tensor]


@dataclass(frozen=True)
class LossType:
    """A registered `online.loss_type`: its reduction, and how the losses of a step's
    micro-batches combine.

    ``global_normalizer``: the reduction divides by ``num_items_in_batch``, the completion tokens
    of the whole step (all gradient-accumulation micro-batches and ranks), so micro-batch losses
    simply add up; and a completion of zero advantage then adds exactly 0 to the loss and the
    gradient (with beta = 0), so the trainer may skip it. Otherwise the reduction normalizes
    within a micro-batch, the trainer divides each micro-batch's loss by the number of
    micro-batches (the mean over them), and every row must be present."""

    name: str
    reduce: Reduction
    global_normalizer: bool = False


_LOSS_TYPES: dict[str, LossType] = {}
LOSS_TYPES: tuple[str, ...] = ()


def register_loss_type(name: str, *, global_normalizer: bool = False) -> Callable[[Reduction], Reduction]:
    """Register a reduction under ``name``: ``grpo_loss(..., loss_type=name)`` and the config's
    ``online.loss_type`` accept it, and the trainer reads its `LossType` record.

    The decorated function is called as
    ``fn(per_token_loss, mask, max_completion_length, num_items_in_batch) -> scalar`` where
    ``per_token_loss`` is (N, T) with padding already zeroed and ``mask`` is (N, T) bool.
    ``global_normalizer``: see `LossType`. ``LOSS_TYPES`` is kept in sync. Re-registering a name
    is an error, so a plugin cannot silently replace a built-in.
    """

    def decorator(fn: Reduction) -> Reduction:
        global LOSS_TYPES
        if name in _LOSS_TYPES:
            raise ValueError(f"loss type {name!r} is already registered")
        _LOSS_TYPES[name] = LossType(name, fn, global_normalizer)
        LOSS_TYPES = tuple(_LOSS_TYPES)
        return fn

    return decorator


def get_loss_type(name: str) -> LossType:
    """The registered record of `name`; ValueError naming the registered ones otherwise."""
    if name not in _LOSS_TYPES:
        raise ValueError(f"unknown loss_type {name!r}; expected one of {', '.join(LOSS_TYPES)}")
    return _LOSS_TYPES[name]


@register_loss_type("grpo")
def _reduce_grpo(per_token_loss, mask, max_completion_length, num_items_in_batch):
    """mean_i [ sum_t l_it / |o_i| ]: each sequence weighs the same (DeepSeekMath); a sequence
    with no valid token contributes 0 but still counts in the mean over sequences."""
    return (per_token_loss.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)).mean()


@register_loss_type("bnpo")
def _reduce_bnpo(per_token_loss, mask, max_completion_length, num_items_in_batch):
    """sum_it l_it / max(1, sum_i |o_i|): each token of this micro-batch weighs the same."""
    return per_token_loss.sum() / mask.sum().clamp(min=1)


@register_loss_type("dr_grpo")
def _reduce_dr_grpo(per_token_loss, mask, max_completion_length, num_items_in_batch):
    """sum_it l_it / (N * max_completion_length) (Dr. GRPO): a constant normalizer, so neither
    long nor short completions are favoured."""
    if max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    return per_token_loss.sum() / (per_token_loss.size(0) * max_completion_length)


@register_loss_type("dapo", global_normalizer=True)
def _reduce_dapo(per_token_loss, mask, max_completion_length, num_items_in_batch):
    """sum_it l_it / num_items_in_batch (DAPO token-level loss): every token of the *global*
    batch (all accumulation steps and processes) weighs the same. Falls back to this batch's
    valid-token count when num_items_in_batch is None."""
    denominator = mask.sum() if num_items_in_batch is None else num_items_in_batch
    return per_token_loss.sum() / torch.as_tensor(denominator, device=per_token_loss.device).clamp(min=1)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO clipped-surrogate loss with an optional k3 KL penalty towards a reference policy.

    Args:
        logps: (N, T) per-token log-probs of the completions under the current policy (N = B*G).
        old_logps: (N, T) log-probs under the policy that sampled them, or None when each
            rollout is used for exactly one update (mu = 1): old = logps.detach(), rho = 1 with
            the gradient of logps (the REINFORCE-style gradient A * grad logp).
        ref_logps: (N, T) log-probs under the reference policy, or None. Needed when beta != 0;
            when given, the ``kl`` metric is reported even with beta == 0.
        advantages: (N,) one advantage per completion, broadcast over its tokens.
        mask: (N, T) True (or 1) at completion tokens, False at padding.
        loss_type: a name in ``LOSS_TYPES``:
            ``grpo``: mean_i [ sum_t l_it / |o_i| ];
            ``bnpo``: sum_it l_it / sum_i |o_i|;
            ``dr_grpo``: sum_it l_it / (N * max_completion_length);
            ``dapo``: sum_it l_it / num_items_in_batch.
            The first three normalize per micro-batch: the caller divides by the number of
            gradient-accumulation steps. ``dapo`` is already global; under DDP, whose gradient
            all-reduce averages over processes, pass num_items_in_batch / world_size (as TRL does).
        epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high] for rho
            (DAPO's clip-higher uses epsilon_high > epsilon_low).
        beta: weight of the k3 KL penalty.
        max_completion_length: generation length limit, required by ``dr_grpo``.
        num_items_in_batch: completion tokens in the global batch, used by ``dapo``.

    Per token::

        rho  = exp(logp - old)
        l_it = -min(rho * A_i, clip(rho, 1 - epsilon_low, 1 + epsilon_high) * A_i) + beta * k3
        k3   = exp(ref - logp) - (ref - logp) - 1

    Returns:
        (loss, metrics). ``metrics`` holds Python floats, all means over valid tokens:
        ``kl`` (mean k3; only when ref_logps is given), ``clip_ratio/low_mean`` (A < 0 and
        rho < 1 - epsilon_low), ``clip_ratio/high_mean`` (A > 0 and rho > 1 + epsilon_high) and
        ``clip_ratio/region_mean`` (either): the tokens whose gradient the clip switched off.
    """
    reduce = get_loss_type(loss_type).reduce
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (pass beta=0.0 to train without a reference)")
    if logps.dim() != 2 or mask.shape != logps.shape or advantages.shape != logps.shape[:1]:
        raise ValueError(
            "expected logps and mask (N, T) and advantages (N,); got "
            f"{tuple(logps.shape)}, {tuple(mask.shape)}, {tuple(advantages.shape)}"
        )

    mask = mask.bool()
    old_logps = logps.detach() if old_logps is None else old_logps
    # Log-ratios are zeroed at padding before exp(): padding values (even inf/NaN) then reach
    # neither the loss nor, through exp's backward, the gradient.
    ratio = torch.exp((logps - old_logps).masked_fill(~mask, 0.0))
    clipped_ratio = ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    adv = advantages.unsqueeze(1)
    per_token_loss = -torch.minimum(ratio * adv, clipped_ratio * adv)

    k3 = None
    if ref_logps is not None:
        # Only build the k3 graph when it is part of the loss; otherwise it is just a metric.
        with torch.set_grad_enabled(beta != 0.0 and torch.is_grad_enabled()):
            log_ratio_ref = (ref_logps - logps).masked_fill(~mask, 0.0)
            k3 = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * k3

    per_token_loss = torch.where(mask, per_token_loss, 0.0)
    loss = reduce(per_token_loss, mask, max_completion_length, num_items_in_batch)
    return loss, _grpo_metrics(ratio, adv, k3, mask, epsilon_low, epsilon_high)


@torch.no_grad()
def _grpo_metrics(
    ratio: Tensor, adv: Tensor, k3: Tensor | None, mask: Tensor, epsilon_low: float, epsilon_high: float
) -> dict[str, float]:
    n_tokens = mask.sum().clamp(min=1)

    def token_mean(x: Tensor) -> Tensor:
        return torch.where(mask, x.float(), 0.0).sum() / n_tokens

    low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    names = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]
    values = [token_mean(low), token_mean(high), token_mean(low | high)]
    if k3 is not None:
        names.append("kl")
        values.append(token_mean(k3))
    # One stack + tolist: a single device sync instead of one per metric.
    return dict(zip(names, torch.stack(values).tolist()))
