r"""Pure loss functions for offline (listwise) and online (TRL's loss types) GRPO.

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

``grpo_loss`` applies one of TRL 1.16's loss types (``LOSS_TYPES``): a registered `LossType`
pairs a per-token objective of the importance ratio ``w = exp(logp - logp_old)`` (per token, or
per completion for GSPO; by default the clipped surrogate
``-min(w A_i, clip(w, 1 - eps_low, 1 + eps_high) A_i)``) with a reduction of the masked
per-token losses, plus an optional k3 KL penalty ``exp(ref - logp) - (ref - logp) - 1``.
tests/test_losses_trl.py checks each against TRL's own ``GRPOTrainer._compute_loss``.
``high_entropy_mask`` and ``truncated_completion_mask`` build the token masks of TRL's
``top_entropy_quantile`` and ``mask_truncated_completions``. Usage::

    adv = group_advantages(rewards, num_generations=8)
    loss, metrics = grpo_loss(logps, old_logps, ref_logps, adv, mask, loss_type="dapo",
                              num_items_in_batch=global_completion_tokens)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "LOSS_TYPES", "LossType", "MAX_SCALED_SCORE", "Objective",
    "cispo_objective", "clipped_surrogate_objective", "get_loss_type", "group_advantages", "grpo_loss",
    "high_entropy_mask", "listwise_kl_loss", "listwise_metrics", "register_loss_type", "sapo_objective",
    "truncated_completion_mask", "vespo_objective", "zero_std_fraction",
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
# Online GRPO: a loss type is a per-token objective plus a reduction
# --------------------------------------------------------------------------------------------

# A reduction maps (per_token_loss (N, T) already zeroed at padding, mask (N, T) bool,
# max_completion_length, num_items_in_batch) to the scalar loss.
Reduction = Callable[[Tensor, Tensor, int | None, int | Tensor | None], Tensor]


# An objective is called with keywords only: the tensors
#     logps       (N, T) current log-probs, with gradient (padding as given: masking comes later)
#     log_ratio   (N, T) logp - logp_old, exactly 0 at padding
#     ratio       importance weight w: (N, T) exp(log_ratio) for importance_sampling_level="token",
#                 (N, 1) exp(mean of the row's valid log_ratio) for "sequence" (GSPO)
#     advantages  (N, 1);  mask  (N, T) bool
# and every hyperparameter keyword of grpo_loss; it names those it reads and takes **_ for the
# rest. It returns (per-token loss broadcastable to (N, T), metrics): unreduced tensors, (N, T)
# ones averaged over valid tokens, (N, 1) ones over the rows with a valid token.
Objective = Callable[..., tuple[Tensor, dict[str, Tensor]]]


def clipped_surrogate_objective(*, ratio, advantages, epsilon_low, epsilon_high, delta, **_):
    """PPO's clipped surrogate (grpo, bnpo, dr_grpo, dapo, luspo)::

        l = -min(min(w, delta) * A, clip(w, 1 - epsilon_low, 1 + epsilon_high) * A)

    ``delta`` (two-sided clipping, INTELLECT-2; None: off) also caps the unclipped ratio, so a
    negative-advantage token far off-policy (w > delta) gets a bounded loss and no gradient.
    Metrics: the tokens (or sequences) whose gradient the clip switched off."""
    w, a = ratio, advantages
    clipped = w.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)
    if delta is not None:
        w = w.clamp(max=delta)
    low, high = (w < 1.0 - epsilon_low) & (a < 0), (w > 1.0 + epsilon_high) & (a > 0)
    metrics = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}
    return -torch.minimum(w * a, clipped * a), metrics


def cispo_objective(*, logps, ratio, advantages, epsilon_high, **_):
    """CISPO (MiniMax-M1): clips the importance weight, not the update, so every token keeps a
    gradient::

        l = -sg(min(w, epsilon_high)) * A * logp          (sg: no gradient through it)

    ``epsilon_high`` is the cap itself, not 1 + epsilon (ScaleRL recommends 5.0)."""
    weight = ratio.clamp(max=epsilon_high).detach()
    return -weight * advantages * logps, {"cispo_clip_ratio": (ratio > epsilon_high) & (advantages > 0)}


def sapo_objective(*, ratio, advantages, sapo_temperature_pos, sapo_temperature_neg, **_):
    """SAPO: a smooth, temperature-controlled gate instead of the hard clip::

        l = -(4 / tau) * sigmoid(tau * (w - 1)) * A,   tau = temperature_pos if A > 0 else _neg

    Its gradient is -A * grad logp on-policy (w = 1) and fades smoothly as w leaves 1."""
    a = advantages
    # Built in the advantages' dtype: a Python-float torch.where would round tau to float32.
    tau = torch.where(a > 0, a.new_tensor(sapo_temperature_pos), a.new_tensor(sapo_temperature_neg))
    return -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a, {}


def vespo_objective(*, logps, log_ratio, advantages, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
                    vespo_lambda_neg, **_):
    """VESPO: a Gamma-shaped weight of the sequence's importance ratio scales the policy gradient::

        log w = clamp(sum_t clamp(log_ratio_t, -20, 20), log 1e-8, 20)              (N, 1)
        phi   = exp(lambda + k log w - lambda w)            (e^lambda w^k e^-lambda w; phi(1) = 1)
        l     = -sg(phi) * A * logp,   (k, lambda) = (k_pos, lambda_pos) if A >= 0 else (_neg, _neg)

    w is the product of the token ratios (whatever importance_sampling_level); a non-finite phi
    becomes 0 and lambda is floored at 1e-4, as in TRL."""
    a = advantages
    with torch.no_grad():
        log_w = log_ratio.clamp(-20.0, 20.0).sum(-1, keepdim=True).clamp(math.log(1e-8), 20.0)
        k = torch.where(a >= 0, a.new_tensor(vespo_k_pos), a.new_tensor(vespo_k_neg))
        lam = torch.where(a >= 0, a.new_tensor(vespo_lambda_pos), a.new_tensor(vespo_lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * a * logps, {"vespo/phi_seq_mean": phi}


@dataclass(frozen=True)
class LossType:
    """A registered `online.loss_type`: its per-token objective, its reduction, and how the
    losses of a step's micro-batches combine.

    ``global_normalizer``: the reduction divides by ``num_items_in_batch``, the completion tokens
    of the whole step (all gradient-accumulation micro-batches and ranks), so micro-batch losses
    simply add up; and a completion of zero advantage then adds exactly 0 to the loss and the
    gradient (with beta = 0), so the trainer may skip it. Otherwise the reduction normalizes
    within a micro-batch, the trainer divides each micro-batch's loss by the number of
    micro-batches (the mean over them), and every row must be present."""

    name: str
    reduce: Reduction
    global_normalizer: bool = False
    objective: Objective = clipped_surrogate_objective


_LOSS_TYPES: dict[str, LossType] = {}
LOSS_TYPES: tuple[str, ...] = ()


def register_loss_type(
    name: str, *, global_normalizer: bool = False, objective: Objective = clipped_surrogate_objective
) -> Callable[[Reduction], Reduction]:
    """Register a reduction and its per-token objective under ``name``: ``grpo_loss`` and the
    config's ``online.loss_type`` accept it, and the trainer reads its `LossType` record. The
    decorated function is called as
    ``fn(per_token_loss, mask, max_completion_length, num_items_in_batch) -> scalar`` where
    ``per_token_loss`` is (N, T) with padding already zeroed and ``mask`` is (N, T) bool.
    ``objective``: see `Objective`. ``global_normalizer``: see `LossType`. Calling the decorator
    on an existing reduction reuses it under a new objective. ``LOSS_TYPES`` is kept in sync.
    Re-registering a name is an error, so a plugin cannot silently replace a built-in.
    """

    def decorator(fn: Reduction) -> Reduction:
        global LOSS_TYPES
        if name in _LOSS_TYPES:
            raise ValueError(f"loss type {name!r} is already registered")
        _LOSS_TYPES[name] = LossType(name, fn, global_normalizer, objective)
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


register_loss_type("cispo", global_normalizer=True, objective=cispo_objective)(_reduce_dapo)
register_loss_type("sapo", objective=sapo_objective)(_reduce_grpo)


@register_loss_type("luspo")
def _reduce_luspo(per_token_loss, mask, max_completion_length, num_items_in_batch):
    """mean_i sum_t l_it (LUSPO): GSPO's per-sequence loss scaled by the sequence's length, which
    removes GSPO's bias towards short sequences (meant for importance_sampling_level="sequence")."""
    return per_token_loss.sum(dim=-1).mean()


register_loss_type("vespo", global_normalizer=True, objective=vespo_objective)(_reduce_dapo)


def grpo_loss(
    logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor, mask: Tensor, *,
    loss_type: str = "grpo", epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
    max_completion_length: int | None = None, num_items_in_batch: int | Tensor | None = None,
    importance_sampling_level: str = "token", delta: float | None = None,
    sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = False, entropy_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss of a registered loss type with an optional k3 KL penalty, as TRL 1.16 computes it
    (keywords named and defaulted as TRL's GRPOConfig fields, except use_bias_correction_kl)::

        l_it = objective(w, A_i, logp_it) * entropy_mask_it + beta * k3_it (* w if bias-corrected)
        k3   = exp(ref - logp) - (ref - logp) - 1

    Args:
        logps: (N, T) per-token log-probs of the completions under the current policy (N = B*G).
        old_logps: (N, T) log-probs under the policy that sampled them, or None when each
            rollout is used for exactly one update (mu = 1): old = logps.detach(), w = 1 with
            the gradient of logps (the REINFORCE-style gradient A * grad logp).
        ref_logps: (N, T) reference log-probs, or None. Needed when beta != 0; when given, the
            ``kl`` metric is reported even with beta == 0.
        advantages: (N,) one advantage per completion, broadcast over its tokens.
        mask: (N, T) True (or 1) at completion tokens, False at padding.
        loss_type: a name in ``LOSS_TYPES``: the objective is the clipped surrogate except for
            cispo, sapo, vespo (``*_objective``); the reduction is
            ``grpo``, ``sapo``: mean_i [ sum_t l_it / |o_i| ];  ``bnpo``: sum_it l_it / sum_i |o_i|;
            ``dr_grpo``: sum_it l_it / (N * max_completion_length);  ``luspo``: mean_i sum_t l_it;
            ``dapo``, ``cispo``, ``vespo``: sum_it l_it / num_items_in_batch, the global ones
            (`LossType`; under DDP, whose all-reduce averages, pass num_items_in_batch /
            world_size, as TRL does). For the others the caller divides by the number of
            gradient-accumulation steps.
        epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high] of w (DAPO's
            clip-higher: epsilon_high > epsilon_low); cispo caps w at epsilon_high itself.
        beta: weight of the KL penalty. max_completion_length: needed by ``dr_grpo``.
        num_items_in_batch: completion tokens of the global batch, for the global types.
        importance_sampling_level: ``"token"`` (a w per token) or ``"sequence"`` (GSPO: one w per
            completion, exp of its mean token log-ratio). delta, sapo_*, vespo_*: see the objectives.
        use_bias_correction_kl: multiply k3 by w (differentiable), which makes its gradient the
            unbiased reverse-KL one (DeepSeek-V3.2). TRL's default is True, ours False.
        entropy_mask: (N, T) bool from `high_entropy_mask`, or None: tokens outside it leave the
            policy term but keep their KL term and their place in the normalizer, as in TRL.

    Returns:
        (loss, metrics): Python floats averaged over valid tokens (per-sequence quantities over
        completions with a valid token): ``kl`` (the KL term; when ref_logps is given) and the
        objective's: ``clip_ratio/low_mean`` (A < 0, w < 1 - epsilon_low), ``/high_mean``
        (A > 0, w > 1 + epsilon_high), ``/region_mean`` (either); ``cispo_clip_ratio`` (A > 0,
        w > epsilon_high); ``vespo/phi_seq_mean``; none for sapo.
    """
    record = get_loss_type(loss_type)
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"beta={beta} needs ref_logps (pass beta=0.0 to train without a reference)")
    if (logps.dim() != 2 or mask.shape != logps.shape or advantages.shape != logps.shape[:1]
            or (entropy_mask is not None and entropy_mask.shape != logps.shape)):
        raise ValueError(
            "expected logps, mask and entropy_mask (N, T) and advantages (N,); got "
            f"{tuple(logps.shape)}, {tuple(mask.shape)}, {tuple(advantages.shape)}"
        )

    mask = mask.bool()
    old_logps = logps.detach() if old_logps is None else old_logps
    # Log-ratios are zeroed at padding before exp(): padding values (even inf/NaN) then reach
    # neither the loss nor, through exp's backward, the gradient.
    log_ratio = (logps - old_logps).masked_fill(~mask, 0.0)
    log_w = log_ratio
    if importance_sampling_level == "sequence":
        # The mean, not the sum: a long completion's ratio would otherwise explode or vanish.
        log_w = log_ratio.sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_w)
    per_token_loss, metric_terms = record.objective(
        logps=logps, log_ratio=log_ratio, ratio=ratio, advantages=advantages.unsqueeze(1), mask=mask,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask

    if ref_logps is not None:
        # Only build the KL graph when it is part of the loss; otherwise it is just a metric.
        with torch.set_grad_enabled(beta != 0.0 and torch.is_grad_enabled()):
            log_ratio_ref = (ref_logps - logps).masked_fill(~mask, 0.0)
            kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0
            if use_bias_correction_kl:
                kl = kl * ratio
        metric_terms["kl"] = kl
        if beta != 0.0:
            per_token_loss = per_token_loss + beta * kl

    per_token_loss = torch.where(mask, per_token_loss, 0.0)  # also broadcasts (N, 1) to (N, T)
    loss = record.reduce(per_token_loss, mask, max_completion_length, num_items_in_batch)
    return loss, _mean_metrics(metric_terms, mask)


@torch.no_grad()
def _mean_metrics(terms: dict[str, Tensor], mask: Tensor) -> dict[str, float]:
    """Each term as a Python float: an (N, T) term averaged over valid tokens, an (N, 1) one
    (per sequence) over rows with a valid token; 0 when there are none."""
    keeps = [mask if x.shape == mask.shape else mask.any(dim=-1, keepdim=True) for x in terms.values()]
    # At least float32 (bools, bf16), float64 kept: a float64 phi can exceed float32's range.
    means = [torch.where(k, x.to(torch.promote_types(x.dtype, torch.float32)), 0.0).sum() / k.sum().clamp(min=1)
             for x, k in zip(terms.values(), keeps)]
    # One stack + tolist: a single device sync instead of one per metric.
    return dict(zip(terms, torch.stack([m.double() for m in means]).tolist())) if means else {}


def high_entropy_mask(entropies: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """The top-``quantile`` of valid tokens by entropy, as ``grpo_loss``'s ``entropy_mask``
    (TRL's ``top_entropy_quantile``, "Beyond the 80/20 Rule", which recommends 0.2).

    entropies: (N, T) entropy of the next-token distribution at each position; mask: (N, T);
    quantile in [0, 1] (1 keeps every valid token). Returns (N, T) bool: valid tokens whose
    entropy is >= the (1 - quantile)-quantile (linear interpolation) of the valid tokens'
    entropies; all False without valid tokens. TRL's ``get_high_entropy_mask(entropies, mask,
    1 - quantile)`` on one process: TRL takes the quantile over one micro-batch (on all ranks).
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    mask = mask.bool()
    valid = entropies[mask].float()
    if quantile == 1.0 or valid.numel() == 0:  # the 0-quantile is the minimum: every valid token passes
        return mask
    return (entropies.float() >= torch.quantile(valid, 1.0 - quantile)) & mask


def truncated_completion_mask(mask: Tensor, terminated: Tensor) -> Tensor:
    """TRL's ``mask_truncated_completions`` (DAPO's overlong filtering): ``mask`` (N, T) with the
    rows of completions that did not end with EOS (``terminated`` (N,) bool False: cut at
    max_completion_length) zeroed, in ``mask``'s dtype. A truncated completion then teaches
    nothing and counts in no normalizer: compute num_items_in_batch from this mask."""
    return torch.where(terminated.bool().unsqueeze(1), mask, torch.zeros_like(mask))
