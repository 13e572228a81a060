"""Tests for grpo_fast.listwise (listwise KL) and grpo_fast.losses (group advantages, the GRPO
clipped surrogate, the sampler's importance-sampling correction)."""

import math

import pytest
import torch
import torch.nn.functional as F

from grpo_fast import losses
from grpo_fast.listwise import MAX_SCALED_SCORE, listwise_kl_loss, listwise_metrics
from grpo_fast.losses import (
    LOSS_TYPES,
    SAMPLING_CORRECTION_MODES,
    get_loss_type,
    group_advantages,
    grpo_loss,
    register_loss_type,
    sampling_importance_weights,
    zero_std_fraction,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# listwise_kl_loss
# --------------------------------------------------------------------------------------------

# Group 0: p = softmax([0, ln3]) = [1/4, 3/4], q = softmax([0, 0]) = [1/2, 1/2].
# Group 1 (third slot masked): p = softmax([0, ln2]) = [1/3, 2/3], q = softmax([ln3, 0]) = [3/4, 1/4].
# Group 2 has a single valid completion, so it is left out of the mean.
HAND_SEQ_LOGPS = torch.tensor([[0.0, LN3, 0.0], [0.0, LN2, 99.0], [5.0, -7.0, 3.0]], dtype=torch.float64)
HAND_SCORES = torch.tensor([[0.0, 0.0, 0.0], [LN3, 0.0, 99.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
HAND_MASK = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])
# KL(q||p): group 0 = 1/2 ln(4/3) = 0.1438410362; group 1 = 3/4 ln(9/4) + 1/4 ln(3/8) = 0.3629903489.
HAND_FORWARD = (0.5 * math.log(4 / 3) + 0.75 * math.log(9 / 4) + 0.25 * math.log(3 / 8)) / 2
# KL(p||q): group 0 = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308120359;
#           group 1 = 1/3 ln(4/9) + 2/3 ln(8/3) = 0.3835760966.
HAND_REVERSE = (
    0.25 * math.log(0.5) + 0.75 * math.log(1.5) + math.log(4 / 9) / 3 + 2 * math.log(8 / 3) / 3
) / 2


def test_listwise_forward_matches_hand_computation():
    loss = listwise_kl_loss(HAND_SEQ_LOGPS, HAND_SCORES, HAND_MASK)
    assert HAND_FORWARD == pytest.approx(0.2534156926, abs=1e-10)
    assert loss.item() == pytest.approx(HAND_FORWARD, abs=1e-12)


def test_listwise_reverse_matches_hand_computation():
    loss = listwise_kl_loss(HAND_SEQ_LOGPS, HAND_SCORES, HAND_MASK, direction="reverse")
    assert HAND_REVERSE == pytest.approx(0.2571940663, abs=1e-10)
    assert loss.item() == pytest.approx(HAND_REVERSE, abs=1e-12)


def test_listwise_forward_equals_kl_div_per_group():
    g = _gen(0)
    seq_logps = torch.randn(4, 5, generator=g, dtype=torch.float64) * 3
    scores = torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool
    )
    expected = torch.stack(
        [
            F.kl_div(seq_logps[b][mask[b]].log_softmax(-1), scores[b][mask[b]].log_softmax(-1),
                     reduction="sum", log_target=True)
            for b in range(4)
        ]
    ).mean()
    torch.testing.assert_close(listwise_kl_loss(seq_logps, scores, mask), expected)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_listwise_gradient_matches_finite_differences(direction):
    g = _gen(1)
    seq_logps = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)

    def fn(x):
        return listwise_kl_loss(
            x, scores, mask, policy_temperature=0.7, score_temperature=1.3, direction=direction
        )

    assert torch.autograd.gradcheck(fn, (seq_logps,))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_listwise_masked_completions_take_no_part(direction):
    g = _gen(2)
    seq_logps = torch.randn(3, 4, generator=g)
    scores = torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    # Padding values must not matter, not even inf/NaN ones.
    other_logps = seq_logps.masked_fill(~mask, float("nan"))
    other_logps[0, 2] = float("inf")
    other_scores = scores.masked_fill(~mask, 1e6)
    other_scores[1, 0] = float("-inf")

    results = []
    for x, s in ((seq_logps, scores), (other_logps, other_scores)):
        x = x.clone().requires_grad_(True)
        loss = listwise_kl_loss(x, s, mask, direction=direction)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    assert torch.all(grad_b[~mask] == 0)
    assert torch.all(grad_b[mask] != 0)


def test_listwise_temperatures_scale_the_logits():
    # policy_temperature 2 on [0, 2 ln3] gives p = [1/4, 3/4]; score_temperature 1/2 on
    # [0, ln2 / 2] gives q = [1/3, 2/3].
    seq_logps = torch.tensor([[0.0, 2 * LN3]], dtype=torch.float64)
    scores = torch.tensor([[0.0, LN2 / 2]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = listwise_kl_loss(seq_logps, scores, mask, policy_temperature=2.0, score_temperature=0.5)
    expected = (1 / 3) * math.log((1 / 3) / (1 / 4)) + (2 / 3) * math.log((2 / 3) / (3 / 4))
    assert loss.item() == pytest.approx(expected, abs=1e-12)

    g = _gen(3)
    seq_logps, scores = torch.randn(2, 3, 4, generator=g)
    mask = torch.ones(3, 4, dtype=torch.bool)
    torch.testing.assert_close(
        listwise_kl_loss(seq_logps, scores, mask, policy_temperature=0.5, score_temperature=4.0),
        listwise_kl_loss(seq_logps / 0.5, scores / 4.0, mask),
    )


def test_listwise_without_eligible_group_is_zero_with_a_gradient_path():
    seq_logps = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [False, False]])
    loss = listwise_kl_loss(seq_logps, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), mask)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(seq_logps.grad, torch.zeros(2, 2))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_listwise_zero_weight_terms_contribute_exactly_zero(direction):
    # Spreads past float32's range: log q (forward's weights) or log p (reverse's) is -inf for
    # the second completion, whose weight is exactly 0; 0 * -inf must not turn into NaN.
    far = torch.tensor([[3e38, -3e38]])
    near = torch.tensor([[0.5, -1.0]])
    seq_logps, scores = (near, far) if direction == "forward" else (far, near)
    x = seq_logps.clone().requires_grad_(True)
    loss = listwise_kl_loss(x, scores, torch.ones(1, 2, dtype=torch.bool), direction=direction)
    loss.backward()
    # Weights [1, 0]: the KL reduces to -log of the other distribution at 0, softmax(near)[0].
    torch.testing.assert_close(loss, -near.log_softmax(-1)[0, 0])
    assert torch.isfinite(x.grad).all()
    if direction == "forward":
        metrics = listwise_metrics(seq_logps, scores, torch.ones(1, 2, dtype=torch.bool))
        assert metrics["kl"] == pytest.approx(loss.item())


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("score_temperature", [1.0, 0.25])
def test_listwise_is_finite_at_the_score_bound(direction, score_temperature):
    # The most extreme scores data validation lets through, in many groups: the float32 loss
    # (up to MAX_SCALED_SCORE * 2 per reverse group) and its gradient stay finite.
    bound = MAX_SCALED_SCORE * score_temperature
    scores = torch.tensor([[bound, -bound, bound, -bound]]).repeat(8, 1)
    x = torch.randn(8, 4, generator=_gen(5)).requires_grad_(True)
    loss = listwise_kl_loss(x, scores, torch.ones(8, 4, dtype=torch.bool),
                            score_temperature=score_temperature, direction=direction)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_listwise_rejects_bad_arguments():
    x = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="direction"):
        listwise_kl_loss(x, x, mask, direction="sideways")
    with pytest.raises(ValueError, match="temperature"):
        listwise_kl_loss(x, x, mask, policy_temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        listwise_kl_loss(x, torch.zeros(1, 3), mask)


def test_listwise_metrics_on_hand_example():
    metrics = listwise_metrics(HAND_SEQ_LOGPS, HAND_SCORES, HAND_MASK)
    # H([1/4, 3/4]) and H([1/3, 2/3]), averaged.
    entropy0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    entropy1 = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)
    assert metrics["entropy"] == pytest.approx((entropy0 + entropy1) / 2, abs=1e-7)
    assert metrics["kl"] == pytest.approx(HAND_FORWARD, abs=1e-7)
    # Group 0 has tied scores (no pair counts); group 1 ranks [0, ln2] opposite to [ln3, 0].
    assert metrics["pairwise_accuracy"] == 0.0
    # Highest seq_logp: group 0 -> slot 1 (score 0); group 1 -> slot 1 (score 0).
    assert metrics["top1_score"] == 0.0


def test_listwise_metrics_pairwise_accuracy_and_top1():
    seq_logps = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 9.0]])
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [0.1, 0.2, 0.3, -5.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    metrics = listwise_metrics(seq_logps, scores, mask)
    # Group 0: 6 pairs, only (1, 2) mis-ordered; group 1: 3 pairs, all in order.
    assert metrics["pairwise_accuracy"] == pytest.approx(8 / 9)
    # Masked slot 3 of group 1 has the highest seq_logp but must not be picked.
    assert metrics["top1_score"] == pytest.approx((0.9 + 0.3) / 2)


def test_listwise_metrics_are_nan_without_eligible_groups():
    metrics = listwise_metrics(torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([[True, False, False]]))
    assert all(math.isnan(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------------


def _trl_advantages(rewards: torch.Tensor, g: int) -> torch.Tensor:
    """TRL's computation, written out literally for comparison."""
    mean_grouped = rewards.view(-1, g).mean(dim=1).repeat_interleave(g, dim=0)
    std_grouped = rewards.view(-1, g).std(dim=1).repeat_interleave(g, dim=0)
    return (rewards - mean_grouped) / (std_grouped + 1e-4)


def test_group_advantages_hand_example():
    # Group [1, 0, 0, 0]: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2.
    # Group [2, 4, 6, 8]: mean 5, unbiased std sqrt(20 / 3).
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0])
    std1 = math.sqrt(20 / 3)
    expected = torch.tensor(
        [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001]
        + [d / (std1 + 1e-4) for d in (-3.0, -1.0, 1.0, 3.0)]
    )
    torch.testing.assert_close(group_advantages(rewards, 4), expected)


def test_group_advantages_scale_modes():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0])
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, -3.0, -1.0, 1.0, 3.0])
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none"), centred)
    batch_std = rewards.std()
    torch.testing.assert_close(group_advantages(rewards, 4, scale="batch"), centred / (batch_std + 1e-4))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, 4, scale="rank")


def test_group_advantages_match_trl():
    rewards = torch.rand(6 * 8, generator=_gen(4)) * 3
    torch.testing.assert_close(group_advantages(rewards, 8), _trl_advantages(rewards, 8))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exactly_zero_advantage(scale):
    # 0.1 is not exact in binary, so mean/std carry rounding residue unless handled.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.3, 0.1, 0.1, 0.1, 0.1])
    advantages = group_advantages(rewards, 3, scale=scale)
    assert torch.equal(advantages[[0, 1, 2, 6, 7, 8]], torch.zeros(6))
    assert torch.all(advantages[3:6] != 0)
    assert zero_std_fraction(rewards, 3) == pytest.approx(2 / 3)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_single_generation_gives_zero_advantage(scale):
    rewards = torch.tensor([1.0, 0.0, 3.0])
    assert torch.equal(group_advantages(rewards, 1, scale=scale), torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([2.0]), 1, scale=scale), torch.zeros(1))
    assert zero_std_fraction(rewards, 1) == 1.0


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="divisible"):
        zero_std_fraction(torch.zeros(7), 4)


def test_group_advantages_accept_integer_rewards():
    advantages = group_advantages(torch.tensor([1, 0, 1, 0]), 2)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, _trl_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 2))


# --------------------------------------------------------------------------------------------
# grpo_loss
# --------------------------------------------------------------------------------------------


def _reference_grpo_loss(logps, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len, num_items,
                         weights=None):
    """Token-by-token loops, written independently of the vectorized implementation; ``weights``:
    the sampler correction, (N, T) or (N, 1), scaling the clipped term of each token."""
    n, t = logps.shape
    rows = []
    for i in range(n):
        terms = []
        for j in range(t):
            if not mask[i, j]:
                continue
            rho = torch.exp(logps[i, j] - old[i, j])
            unclipped = rho * adv[i]
            clipped = torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv[i]
            term = -(unclipped if unclipped <= clipped else clipped)
            if weights is not None:
                term = term * weights[i, min(j, weights.shape[1] - 1)]
            if beta:
                d = ref[i, j] - logps[i, j]
                term = term + beta * (torch.exp(d) - d - 1)
            terms.append(term)
        rows.append(terms)
    zero = logps.sum() * 0  # keeps the graph for rows or batches without tokens
    total = sum((term for terms in rows for term in terms), zero)
    n_tokens = sum(len(terms) for terms in rows)
    if loss_type == "grpo":
        return sum((sum(terms, zero) / max(len(terms), 1) for terms in rows), zero) / n
    if loss_type == "bnpo":
        return total / max(n_tokens, 1)
    if loss_type == "dr_grpo":
        return total / (n * max_len)
    return total / (num_items if num_items is not None else max(n_tokens, 1))


def _random_batch(seed, n=6, t=7, beta=True):
    g = _gen(seed)
    logps = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    # mu > 1: old log-probs differ, so ratios spread past the clip range.
    old = logps + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.3
    ref = logps + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) < 0.7
    mask[:, 0] = True
    mask[2] = False  # a row with no valid token
    return logps, old, ref if beta else None, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_reference_loss_and_gradients(loss_type, beta):
    logps, old, ref, adv, mask = _random_batch(seed=10)
    kwargs = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=beta,
                  max_completion_length=9, num_items_in_batch=57 if loss_type == "dapo" else None)

    x = logps.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, old, ref, adv, mask, **kwargs)
    loss.backward()

    y = logps.clone().requires_grad_(True)
    expected = _reference_grpo_loss(y, old, ref, adv, mask, loss_type, 0.2, 0.28, beta, 9,
                                    kwargs["num_items_in_batch"])
    expected.backward()

    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(x.grad, y.grad)
    assert torch.all(x.grad[~mask] == 0)


def test_grpo_loss_without_old_logps_is_the_policy_gradient():
    # mu = 1: rho == 1 exactly, so the grpo loss is -mean_i A_i and d loss / d logp_it = -A_i / (|o_i| N).
    logps, _, _, adv, mask = _random_batch(seed=11, beta=False)
    x = logps.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, None, None, adv, mask)
    loss.backward()
    lengths = mask.sum(-1)
    expected = -(adv * (lengths > 0)).sum() / len(adv)
    torch.testing.assert_close(loss, expected)
    expected_grad = torch.where(mask, -(adv / lengths.clamp(min=1) / len(adv)).unsqueeze(1), 0.0)
    torch.testing.assert_close(x.grad, expected_grad)
    assert metrics["clip_ratio/region_mean"] == 0.0
    assert "kl" not in metrics


def test_grpo_loss_uses_stored_old_logps():
    logps, old, _, adv, mask = _random_batch(seed=12, beta=False)
    with_old, metrics = grpo_loss(logps, old, None, adv, mask)
    without_old, _ = grpo_loss(logps, None, None, adv, mask)
    ratio = torch.exp(logps - old)
    assert not torch.allclose(ratio[mask], torch.ones_like(ratio[mask]))
    assert not torch.isclose(with_old, without_old)
    assert metrics["clip_ratio/region_mean"] > 0


def test_clipped_tokens_get_no_gradient():
    eps = 0.2
    old = torch.zeros(4, 1)
    # rho per row: 1.5 (A>0, above 1+eps: clipped), 0.5 (A<0, below 1-eps: clipped),
    #              0.5 (A>0: min keeps the unclipped term), 1.5 (A<0: unclipped term kept).
    logps = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, metrics = grpo_loss(logps, old, None, adv, mask, epsilon_low=eps, epsilon_high=eps)
    loss.backward()
    grad = logps.grad.squeeze(1)
    assert grad[0] == 0 and grad[1] == 0
    # d/dlogp of -rho * A / N = -rho * A / 4.
    torch.testing.assert_close(grad[2:], torch.tensor([-0.5 / 4, 1.5 / 4]))
    assert metrics["clip_ratio/high_mean"] == 0.25
    assert metrics["clip_ratio/low_mean"] == 0.25
    assert metrics["clip_ratio/region_mean"] == 0.5


def test_asymmetric_clip_range():
    # rho = 1.25 with A > 0 is clipped at epsilon_high 0.2 but not at 0.28 (DAPO clip-higher).
    logps = torch.full((1, 1), math.log(1.25), requires_grad=True)
    args = (logps, torch.zeros(1, 1), None, torch.ones(1), torch.ones(1, 1, dtype=torch.bool))
    _, clipped = grpo_loss(*args, epsilon_high=0.2)
    _, free = grpo_loss(*args, epsilon_high=0.28)
    assert clipped["clip_ratio/high_mean"] == 1.0
    assert free["clip_ratio/high_mean"] == 0.0


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    logps, _, ref, adv, mask = _random_batch(seed=13)
    _, metrics = grpo_loss(logps, None, ref, adv, mask, beta=0.0)  # kl reported even with beta 0
    assert metrics["kl"] > 0
    d = ref - logps
    assert torch.all(torch.exp(d) - d - 1 >= 0)

    x = logps.clone().requires_grad_(True)
    loss_same, metrics_same = grpo_loss(x, None, logps, adv, mask, beta=0.5)
    assert metrics_same["kl"] == 0.0
    loss_nokl, _ = grpo_loss(logps, None, None, adv, mask)
    torch.testing.assert_close(loss_same, loss_nokl)


def test_kl_penalty_pulls_towards_reference():
    # With A = 0 only the penalty acts; its gradient 1 - exp(ref - logp) points logp towards ref.
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, _ = grpo_loss(logps, None, ref, torch.zeros(1), torch.ones(1, 2, dtype=torch.bool), beta=1.0)
    loss.backward()
    assert logps.grad[0, 0] > 0 and logps.grad[0, 1] < 0


def test_dapo_normalizes_by_global_token_count():
    logps, old, _, adv, mask = _random_batch(seed=14, beta=False)
    local, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dapo")
    bnpo, _ = grpo_loss(logps, old, None, adv, mask, loss_type="bnpo")
    torch.testing.assert_close(local, bnpo)  # None falls back to this batch's token count
    n_local = int(mask.sum())
    global_, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dapo", num_items_in_batch=4 * n_local)
    torch.testing.assert_close(global_, local / 4)
    as_tensor, _ = grpo_loss(logps, old, None, adv, mask, loss_type="dapo",
                             num_items_in_batch=torch.tensor(4 * n_local))
    torch.testing.assert_close(as_tensor, global_)


def test_padding_values_do_not_leak_into_the_loss():
    logps, old, ref, adv, mask = _random_batch(seed=15)
    noisy = logps.masked_fill(~mask, float("nan")).requires_grad_(True)
    for loss_type in LOSS_TYPES:
        loss, metrics = grpo_loss(noisy, old, ref, adv, mask, loss_type=loss_type, beta=0.1,
                                  max_completion_length=9)
        clean, clean_metrics = grpo_loss(logps, old, ref, adv, mask, loss_type=loss_type, beta=0.1,
                                         max_completion_length=9)
        torch.testing.assert_close(loss, clean)
        assert metrics == pytest.approx(clean_metrics)
    loss.backward()
    assert torch.isfinite(noisy.grad).all()


def test_grpo_loss_all_padding_is_finite():
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for loss_type in LOSS_TYPES:
        loss, metrics = grpo_loss(logps, None, logps.detach(), torch.ones(2), mask, loss_type=loss_type,
                                  max_completion_length=3)
        assert loss.item() == 0.0
        assert all(v == 0.0 for v in metrics.values())


def test_grpo_loss_errors():
    logps = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.ones(2)
    with pytest.raises(ValueError, match=r"unknown loss_type 'ppo'; expected one of grpo, bnpo, dr_grpo, dapo"):
        grpo_loss(logps, None, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logps, None, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        grpo_loss(logps, None, None, torch.ones(3), mask)


def test_register_loss_type(monkeypatch):
    monkeypatch.setattr(losses, "_LOSS_TYPES", dict(losses._LOSS_TYPES))
    monkeypatch.setattr(losses, "LOSS_TYPES", losses.LOSS_TYPES)

    @register_loss_type("sum")
    def _reduce_sum(per_token_loss, mask, max_completion_length, num_items_in_batch):
        return per_token_loss.sum()

    assert losses.LOSS_TYPES[-1] == "sum"
    logps, old, _, adv, mask = _random_batch(seed=16, beta=False)
    total, _ = grpo_loss(logps, old, None, adv, mask, loss_type="sum")
    mean, _ = grpo_loss(logps, old, None, adv, mask, loss_type="bnpo")
    torch.testing.assert_close(total, mean * mask.sum())
    with pytest.raises(ValueError, match="already registered"):
        register_loss_type("grpo")(_reduce_sum)
    assert losses.get_loss_type("sum").global_normalizer is False
    assert losses.get_loss_type("dapo").global_normalizer is True
    with pytest.raises(ValueError, match="unknown loss_type 'nope'; expected one of grpo, bnpo"):
        losses.get_loss_type("nope")


def test_loss_types_lists_the_builtins():
    assert LOSS_TYPES == ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


# --------------------------------------------------------------------------------------------
# The sampler's importance-sampling correction (TRL's vllm_importance_sampling_correction)
# --------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
# d = trainer - sampler at the valid tokens; row 1's third token and rows 2 and 3 past their
# first token are padding (garbage there), row 3 has no valid token at all. The sampler's
# log-prob of token (0, 2) is unavailable (NaN): its d counts as 0.
IS_MASK = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [False, False, False]])
IS_D = torch.tensor([[LN2, -2 * LN2, 0.0], [3 * LN2, -LN2, 0.0], [math.log(1.5), 0.0, 0.0], [0.0, 0.0, 0.0]],
                    dtype=torch.float64)
IS_SAMPLER = torch.tensor([[-1.0, -0.5, NAN], [-2.0, -0.1, INF], [-0.3, NAN, 4.0], [NAN, -INF, 0.0]],
                          dtype=torch.float64)
IS_PADDING = torch.tensor([[0, 0, 0], [0, 0, 7.0], [0, NAN, INF], [5.0, NAN, -INF]], dtype=torch.float64)
IS_TRAINER = torch.where(IS_MASK, IS_SAMPLER.nan_to_num(0.0) + IS_D, IS_PADDING)
# Token ratios exp(d): [[2, 1/4, 1], [8, 1/2, -], [3/2, -, -], [-, -, -]]; sequence ratios
# exp(sum d): [1/2, 4, 3/2, 1]. |d| over the 5 tokens with a sampler log-prob: ln2, 2 ln2, 3 ln2,
# ln2, ln 1.5. Bounds [clip_min, 3]: 8 (token) and 4 (sequence) are above; 1/4 and 1/2 below
# clip_min 0.3 and 0.6.
IS_DIFF = dict(mean=(7 * LN2 + math.log(1.5)) / 5, max=3 * LN2)
IS_CASES = {
    # mode, clip_min: weights (padding 1), ratio min / mean / max, clipped_fraction
    ("token_truncate", None): ([[2, .25, 1], [3, .5, 1], [1.5, 1, 1], [1, 1, 1]], (.25, 8.25 / 6, 3), 1 / 6),
    ("token_truncate", 0.3): ([[2, .3, 1], [3, .5, 1], [1.5, 1, 1], [1, 1, 1]], (.3, 8.3 / 6, 3), 2 / 6),
    ("token_mask", None): ([[2, .25, 1], [0, .5, 1], [1.5, 1, 1], [1, 1, 1]], (0, 5.25 / 6, 2), 1 / 6),
    ("token_mask", 0.3): ([[2, 0, 1], [0, .5, 1], [1.5, 1, 1], [1, 1, 1]], (0, 5 / 6, 2), 2 / 6),
    # Sequence modes: statistics over all 4 rows (as TRL), the clipped fraction over the 3 with a token.
    ("sequence_truncate", None): ([[.5], [3], [1.5], [1]], (.5, 6 / 4, 3), 1 / 3),
    ("sequence_truncate", 0.6): ([[.6], [3], [1.5], [1]], (.6, 6.1 / 4, 3), 2 / 3),
    ("sequence_mask", None): ([[.5], [0], [1.5], [1]], (0, 3 / 4, 1.5), 1 / 3),
    ("sequence_mask", 0.6): ([[0], [0], [1.5], [1]], (0, 2.5 / 4, 1.5), 2 / 3),
}


@pytest.mark.parametrize("mode, clip_min", list(IS_CASES), ids=lambda x: str(x))
def test_sampling_importance_weights_hand_example(mode, clip_min):
    expected, (lo, mean, hi), clipped = IS_CASES[mode, clip_min]
    trainer = IS_TRAINER.clone().requires_grad_(True)
    weights, metrics = sampling_importance_weights(trainer, IS_SAMPLER, IS_MASK.int(), mode=mode,
                                                   clip_min=clip_min, clip_max=3.0)
    assert not weights.requires_grad
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    assert metrics == pytest.approx({
        "sampling/sampling_logp_difference/mean": IS_DIFF["mean"],
        "sampling/sampling_logp_difference/max": IS_DIFF["max"],
        "sampling/importance_sampling_ratio/min": lo,
        "sampling/importance_sampling_ratio/mean": mean,
        "sampling/importance_sampling_ratio/max": hi,
        "sampling/importance_sampling_ratio/clipped_fraction": clipped,
    })


def test_sampling_importance_weights_unbounded_and_edge_cases():
    # No bounds: the raw ratios, nothing clipped.
    weights, metrics = sampling_importance_weights(IS_TRAINER, IS_SAMPLER, IS_MASK, mode="token_truncate",
                                                   clip_max=None)
    torch.testing.assert_close(weights[IS_MASK], torch.tensor([2, .25, 1, 8, .5, 1.5], dtype=torch.float64))
    assert metrics["sampling/importance_sampling_ratio/clipped_fraction"] == 0.0
    # No valid token: every token metric is 0; bf16 inputs give float32 weights.
    none = torch.zeros(2, 3, dtype=torch.bool)
    weights, metrics = sampling_importance_weights(torch.zeros(2, 3, dtype=torch.bfloat16),
                                                   torch.ones(2, 3, dtype=torch.bfloat16), none, mode="token_mask")
    assert weights.dtype == torch.float32 and all(v == 0.0 for v in metrics.values())
    assert set(SAMPLING_CORRECTION_MODES) == {"token_truncate", "token_mask", "sequence_truncate", "sequence_mask"}
    with pytest.raises(ValueError, match="mode must be one of"):
        sampling_importance_weights(IS_TRAINER, IS_SAMPLER, IS_MASK, mode="token_clip")
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        sampling_importance_weights(IS_TRAINER, IS_SAMPLER[:, :2], IS_MASK)


def _sampling_weights(mask, per_sequence, seed=20):
    g = _gen(seed)
    weights = torch.rand(mask.shape[0], 1 if per_sequence else mask.shape[1], generator=g, dtype=torch.float64)
    weights = weights * 2 + 0.1
    weights[0, 0] = 0.0  # a masked-out token (or sequence)
    return weights


@pytest.mark.parametrize("per_sequence", [False, True], ids=["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_with_sampling_weights_matches_the_hand_weighted_loss(loss_type, beta, per_sequence):
    logps, old, ref, adv, mask = _random_batch(seed=21)
    weights = _sampling_weights(mask, per_sequence)
    x = logps.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, old, ref, adv, mask, loss_type=loss_type, epsilon_high=0.28, beta=beta,
                        num_items_in_batch=40, sampling_weights=weights)
    loss.backward()
    y = logps.clone().requires_grad_(True)
    expected = _reference_grpo_loss(y, old, ref, adv, mask, loss_type, 0.2, 0.28, beta, None, 40, weights=weights)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sampling_weights_scale_the_policy_term_only(loss_type):
    logps, old, ref, adv, mask = _random_batch(seed=22)
    kwargs = dict(loss_type=loss_type, max_completion_length=9, num_items_in_batch=40)
    plain, metrics = grpo_loss(logps, old, None, adv, mask, **kwargs)
    ones, ones_metrics = grpo_loss(logps, old, None, adv, mask, sampling_weights=torch.ones_like(logps), **kwargs)
    torch.testing.assert_close(ones, plain, rtol=0, atol=0)  # all-ones weights change nothing
    assert ones_metrics == metrics
    half, _ = grpo_loss(logps, old, None, adv, mask, sampling_weights=torch.full_like(logps, 0.5), **kwargs)
    if get_loss_type(loss_type).folds_sampling_weights:
        # VESPO: w gains a factor 0.5 per valid token, which moves phi, not a factor on the loss.
        assert not torch.allclose(half, plain) and not torch.allclose(half, plain / 2)
    else:
        torch.testing.assert_close(half, plain / 2)
    # Zero advantages leave only the KL term, which the weights do not touch (TRL's order).
    zero = torch.zeros_like(adv)
    kl, _ = grpo_loss(logps, old, ref, zero, mask, beta=0.1, **kwargs)
    kl_weighted, _ = grpo_loss(logps, old, ref, zero, mask, beta=0.1, sampling_weights=torch.full_like(logps, 0.5),
                               **kwargs)
    torch.testing.assert_close(kl_weighted, kl)


def test_sampling_weights_shape_errors():
    logps, mask, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2)
    with pytest.raises(ValueError, match="sampling_weights"):
        grpo_loss(logps, None, None, adv, mask, sampling_weights=torch.ones(2, 2))
    grpo_loss(logps, None, None, adv, mask, sampling_weights=torch.ones(2, 1))  # a sequence mode's shape
    with pytest.raises(ValueError, match="vespo.*token-level"):
        grpo_loss(logps, None, None, adv, mask, loss_type="vespo", sampling_weights=torch.ones(2, 1))
