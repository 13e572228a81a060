r"""Pure loss functions for online GRPO: group advantages and TRL 1.16's loss types.

Everything here takes tensors and returns tensors (plus a dict of Python floats for logging);
nothing knows about models, tokenizers or the trainer, so each formula is testable on its own.
Offline GRPO's listwise KL lives in grpo_fast.listwise.

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
``top_entropy_quantile`` and ``mask_truncated_completions``.

A sampler whose numerics differ from the training forward (vLLM) samples slightly off-policy;
``sampling_importance_weights`` turns its per-token log-probs into TRL's correction weights
(``vllm_importance_sampling_mode``), ``exp(logp_old - logp_sampler)`` per token or per completion,
truncated or masked to [clip_min, clip_max], which ``grpo_loss`` multiplies into the policy term
(VESPO folds them into its sequence weight). Usage::

    adv = group_advantages(rewards, num_generations=8)
    weights, is_metrics = sampling_importance_weights(old_logps, sampler_logps, mask, mode="token_mask")
    loss, metrics = grpo_loss(logps, old_logps, ref_logps, adv, mask, loss_type="dapo",
                              num_items_in_batch=global_completion_tokens, sampling_weights=weights)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "LOSS_TYPES", "LossType", "Objective", "SAMPLING_CORRECTION_MODES",
    "cispo_objective", "clipped_surrogate_objective", "get_loss_type", "group_advantages", "grpo_loss",
    "high_entropy_mask", "register_loss_type", "sampling_importance_weights", "sapo_objective",
    "truncated_completion_mask", "vespo_objective", "zero_std_fraction",
]

# Added to the std before dividing, as in TRL, so advantages match TRL's to the last bit.
ADVANTAGE_EPS = 1e-4
SCALE_MODES = ("group", "batch", "none")
# TRL's vllm_importance_sampling_mode values: the ratio's level, and what happens outside the bounds.
SAMPLING_CORRECTION_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


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
#     sampling_weights  the sampler correction (N, T) or (N, 1), no gradient, or None: grpo_loss
#                 multiplies the objective's terms by it unless the LossType folds it in itself
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


def vespo_objective(*, logps, log_ratio, advantages, mask, sampling_weights, vespo_k_pos, vespo_lambda_pos,
                    vespo_k_neg, vespo_lambda_neg, **_):
    """VESPO: a Gamma-shaped weight of the sequence's importance ratio scales the policy gradient::

        log w = clamp(sum_t clamp(log_ratio_t, -20, 20) + sum_t clamp(log s_t, log 1e-8, 20), log 1e-8, 20)
        phi   = exp(lambda + k log w - lambda w)            (e^lambda w^k e^-lambda w; phi(1) = 1)
        l     = -sg(phi) * A * logp,   (k, lambda) = (k_pos, lambda_pos) if A >= 0 else (_neg, _neg)

    log w (N, 1) is the log of the product of the token ratios (whatever importance_sampling_level)
    and, with ``sampling_weights`` s (N, T), of the sampler correction over the valid tokens: the
    weight of the sequence against the sampler, pi / pi_old * pi_old / pi_sampler (TRL folds s in
    only so, and so needs the token_* modes). A non-finite phi becomes 0 and lambda is floored at
    1e-4, as in TRL."""
    a = advantages
    with torch.no_grad():
        log_w = log_ratio.clamp(-20.0, 20.0).sum(-1, keepdim=True)
        if sampling_weights is not None:
            if sampling_weights.shape != mask.shape:
                raise ValueError("loss_type='vespo' takes token-level sampling_weights (N, T) (a token_* "
                                 f"sampling correction mode, as TRL), got {tuple(sampling_weights.shape)}")
            # A masked-out token (weight 0) clamps to log 1e-8 instead of -inf; padding adds nothing.
            log_s = sampling_weights.log().clamp(math.log(1e-8), 20.0)
            log_w = log_w + torch.where(mask, log_s, 0.0).sum(-1, keepdim=True)
        log_w = log_w.clamp(math.log(1e-8), 20.0)
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
    micro-batches (the mean over them), and every row must be present.

    ``folds_sampling_weights``: the objective builds grpo_loss's ``sampling_weights`` into its own
    terms (VESPO, into its sequence weight), so grpo_loss does not multiply them in afterwards."""

    name: str
    reduce: Reduction
    global_normalizer: bool = False
    objective: Objective = clipped_surrogate_objective
    folds_sampling_weights: bool = False


_LOSS_TYPES: dict[str, LossType] = {}
LOSS_TYPES: tuple[str, ...] = ()


def register_loss_type(
    name: str, *, global_normalizer: bool = False, objective: Objective = clipped_surrogate_objective,
    folds_sampling_weights: bool = False,
) -> Callable[[Reduction], Reduction]:
    """Register a reduction and its per-token objective under ``name``: ``grpo_loss`` and the
    config's ``online.loss_type`` accept it, and the trainer reads its `LossType` record. The
    decorated function is called as
    ``fn(per_token_loss, mask, max_completion_length, num_items_in_batch) -> scalar`` where
    ``per_token_loss`` is (N, T) with padding already zeroed and ``mask`` is (N, T) bool.
    ``objective``: see `Objective`. ``global_normalizer``, ``folds_sampling_weights``: see
    `LossType`. Calling the decorator
    on an existing reduction reuses it under a new objective. ``LOSS_TYPES`` is kept in sync.
    Re-registering a name is an error, so a plugin cannot silently replace a built-in.
    """

    def decorator(fn: Reduction) -> Reduction:
        global LOSS_TYPES
        if name in _LOSS_TYPES:
            raise ValueError(f"loss type {name!r} is already registered")
        _LOSS_TYPES[name] = LossType(name, fn, global_normalizer, objective, folds_sampling_weights)
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


register_loss_type("vespo", global_normalizer=True, objective=vespo_objective,
                   folds_sampling_weights=True)(_reduce_dapo)


def grpo_loss(
    logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor, mask: Tensor, *,
    loss_type: str = "grpo", epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0,
    max_completion_length: int | None = None, num_items_in_batch: int | Tensor | None = None,
    importance_sampling_level: str = "token", delta: float | None = None,
    sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = False, entropy_mask: Tensor | None = None,
    sampling_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss of a registered loss type with an optional k3 KL penalty, as TRL 1.16 computes it
    (keywords named and defaulted as TRL's GRPOConfig fields, except use_bias_correction_kl)::

        l_it = objective(w, A_i, logp_it) * entropy_mask_it * s_it + beta * k3_it (* w if bias-corrected)
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
        sampling_weights: s, (N, T) or (N, 1) (no gradient), from `sampling_importance_weights`,
            or None (s = 1): corrects for a sampler whose numerics differ from this forward (vLLM).
            It scales the policy term only, not the KL term, as in TRL; a `LossType` with
            ``folds_sampling_weights`` (vespo: token-level s only) puts it into its objective instead.

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
            or (entropy_mask is not None and entropy_mask.shape != logps.shape)
            or (sampling_weights is not None and sampling_weights.shape not in (logps.shape, logps.shape[:1] + (1,)))):
        raise ValueError(
            "expected logps, mask and entropy_mask (N, T), advantages (N,) and sampling_weights (N, T) or "
            f"(N, 1); got {tuple(logps.shape)}, {tuple(mask.shape)}, {tuple(advantages.shape)}, "
            f"{None if sampling_weights is None else tuple(sampling_weights.shape)}"
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
    # A correction weight, not part of the objective's graph: no gradient flows into it.
    sampling_weights = None if sampling_weights is None else sampling_weights.detach()
    per_token_loss, metric_terms = record.objective(
        logps=logps, log_ratio=log_ratio, ratio=ratio, advantages=advantages.unsqueeze(1), mask=mask,
        epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, sampling_weights=sampling_weights)
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if sampling_weights is not None and not record.folds_sampling_weights:
        per_token_loss = per_token_loss * sampling_weights

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


# --------------------------------------------------------------------------------------------
# Online GRPO: correcting for a sampler whose numerics differ from the training forward (vLLM)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def sampling_importance_weights(
    trainer_logps: Tensor, sampler_logps: Tensor, mask: Tensor, *, mode: str = "sequence_mask",
    clip_min: float | None = None, clip_max: float | None = 3.0,
) -> tuple[Tensor, dict[str, float]]:
    """grpo_loss's ``sampling_weights``: TRL 1.16's ``vllm_importance_sampling_correction``.

    With ``d_it = trainer_logps_it - sampler_logps_it`` at valid tokens (0 at padding and where
    the sampler's log-prob is NaN, i.e. unavailable) and ``[lo, hi] = [clip_min, clip_max]``
    (None: unbounded on that side)::

        token_*:     r_it = exp(d_it)                        (N, T)
        sequence_*:  r_i  = exp(sum_t d_it)                  (N, 1)   (the product of the token ratios)
        *_truncate:  s = clamp(r, lo, hi)
        *_mask:      s = r where lo <= r <= hi, else 0

    Args:
        trainer_logps: (N, T) log-probs of the sampled tokens under the sampling policy, computed
            by the training forward (grpo_loss's ``old_logps``); no gradient is taken.
        sampler_logps: (N, T) the sampler's log-probs of the same tokens, NaN where unavailable.
        mask: (N, T) True (or 1) at completion tokens.
        mode: one of ``SAMPLING_CORRECTION_MODES`` (TRL's ``vllm_importance_sampling_mode``).
        clip_min, clip_max: the bounds (TRL's ``vllm_importance_sampling_clip_min`` / ``_max``).

    Returns:
        (s, metrics): s, (N, T) or (N, 1) in at least float32, without gradient (1 at padding
        unless the bounds exclude 1); metrics as Python floats, TRL's names:
        ``sampling/sampling_logp_difference/mean``, ``/max``: of |d| over valid tokens with a
        sampler log-prob (0 without any); ``sampling/importance_sampling_ratio/min``, ``/mean``,
        ``/max``: of s over valid tokens (token modes) or over all rows (sequence modes, as TRL;
        0 without any); and ``sampling/importance_sampling_ratio/clipped_fraction``: the share of
        valid tokens (token modes) or of rows with a valid token (sequence modes) whose r lay
        outside [lo, hi], so was truncated or masked.
    """
    if mode not in SAMPLING_CORRECTION_MODES:
        raise ValueError(f"mode must be one of {SAMPLING_CORRECTION_MODES}, got {mode!r}")
    if trainer_logps.dim() != 2 or sampler_logps.shape != trainer_logps.shape or mask.shape != trainer_logps.shape:
        raise ValueError("expected trainer_logps, sampler_logps and mask (N, T); got "
                         f"{tuple(trainer_logps.shape)}, {tuple(sampler_logps.shape)}, {tuple(mask.shape)}")
    mask = mask.bool()
    # At least float32: in bf16 the difference of two nearly equal log-probs is mostly rounding.
    dtype = torch.promote_types(torch.promote_types(trainer_logps.dtype, sampler_logps.dtype), torch.float32)
    d = trainer_logps.to(dtype) - sampler_logps.to(dtype)
    known = mask & ~d.isnan()
    # torch.where, not a product with the mask: padding may hold inf or NaN.
    d = torch.where(known, d, 0.0)
    sequence = mode.startswith("sequence")
    ratio = torch.exp(d.sum(dim=-1, keepdim=True) if sequence else d)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    outside = (ratio < lo) | (ratio > hi)
    weights = ratio.clamp(lo, hi) if mode.endswith("truncate") else ratio.masked_fill(outside, 0.0)

    # What the ratio statistics run over: TRL's (every row in sequence modes, valid tokens else).
    stats = torch.ones_like(weights, dtype=torch.bool) if sequence else mask
    counted = mask.any(dim=-1, keepdim=True) if sequence else mask  # rows (tokens) that can be clipped
    n_stats = stats.sum()
    values = [
        d.abs().sum() / known.sum().clamp(min=1),
        d.abs().amax(),  # d is 0 off the known tokens: 0 when there are none
        torch.where(n_stats > 0, torch.where(stats, weights, math.inf).amin(), 0.0),
        torch.where(stats, weights, 0.0).sum() / n_stats.clamp(min=1),
        torch.where(stats, weights, 0.0).amax(),  # weights are >= 0
        (outside & counted).sum() / counted.sum().clamp(min=1),
    ]
    names = ("sampling/sampling_logp_difference/mean", "sampling/sampling_logp_difference/max",
             *(f"sampling/importance_sampling_ratio/{s}" for s in ("min", "mean", "max", "clipped_fraction")))
    # One stack + tolist: a single device sync for all the metrics.
    return weights, dict(zip(names, torch.stack([v.double() for v in values]).tolist()))
