"""TRL 1.16's GRPO loss options in grpo_fast.losses, each checked twice on the same random inputs:
against a row-by-row computation written here from the papers' formulas, and against TRL's own
``GRPOTrainer._compute_loss`` (values, gradients with respect to the log-probs, and metrics).

TRL's method runs on a bare instance (``object.__new__(GRPOTrainer)``) holding only the attributes
it reads, with ``_get_per_token_logps_and_entropies`` replaced by one returning our log-probs and
Accelerate's collectives by identities (one process). Unless a test says otherwise, it is one
micro-batch: ``gradient_accumulation_steps = steps_per_generation = 1`` and
``num_items_in_batch = mask.sum()``, where TRL's normalizers and ours coincide.

    pytest tests/test_losses_trl.py
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from grpo_fast import losses
from grpo_fast.losses import (
    LOSS_TYPES,
    cispo_objective,
    clipped_surrogate_objective,
    get_loss_type,
    grpo_loss,
    high_entropy_mask,
    register_loss_type,
    sapo_objective,
    truncated_completion_mask,
    vespo_objective,
)

SURROGATE_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
GLOBAL_TYPES = ("dapo", "cispo", "vespo")  # TRL divides these by num_items_in_batch
MAX_LEN = 9
# The options that reach TRL through self.args, with TRL's defaults.
ARGS_DEFAULTS = dict(delta=None, use_bias_correction_kl=False, sapo_temperature_pos=1.0,
                     sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                     vespo_lambda_neg=2.0)


def _batch(seed=0, n=6, t=7, empty_row=True):
    """float64 (logps, old, ref, advantages, mask, entropies), masks ragged; old far enough from
    logps that token and sequence ratios leave the clip range on both sides."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    # Per-token noise plus a per-completion drift, so that sequence-level ratios spread too.
    old = logps + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.4
    old = old + torch.randn(n, 1, generator=g, dtype=torch.float64) * 0.3
    ref = logps + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[1] = t
    if empty_row:
        lengths[2] = 0
    mask = torch.arange(t) < lengths.unsqueeze(1)
    # One decimal: ties, which the quantile threshold must keep on both sides.
    entropies = (torch.rand(n, t, generator=g) * 3).round(decimals=1)
    return logps, old, ref, adv, mask, entropies


# --------------------------------------------------------------------------------------------
# The independent computation
# --------------------------------------------------------------------------------------------


def _reference_loss(logps, old, ref, adv, mask, *, loss_type, epsilon_low=0.2, epsilon_high=0.2, beta=0.0,
                    max_completion_length=None, num_items_in_batch=None, importance_sampling_level="token",
                    delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, vespo_k_pos=2.0,
                    vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0, use_bias_correction_kl=False,
                    entropy_mask=None):
    """Row by row over each completion's valid tokens, straight from the formulas."""
    old = logps.detach() if old is None else old
    n = logps.shape[0]
    zero = logps.sum() * 0  # keeps the graph for empty rows
    row_sums, lengths = [], []
    for i in range(n):
        m = mask[i]
        lp, log_ratio, length, a = logps[i][m], logps[i][m] - old[i][m], int(m.sum()), float(adv[i])
        if importance_sampling_level == "sequence":  # GSPO: the geometric mean of the token ratios
            w = torch.exp(log_ratio.sum() / max(length, 1)).expand(length)
        else:
            w = torch.exp(log_ratio)
        if loss_type == "cispo":
            term = -torch.clamp(w, max=epsilon_high).detach() * a * lp
        elif loss_type == "sapo":
            tau = sapo_temperature_pos if a > 0 else sapo_temperature_neg
            term = -(4 / tau) * torch.sigmoid(tau * (w - 1)) * a
        elif loss_type == "vespo":
            log_w = min(max(float(log_ratio.detach().clamp(-20, 20).sum()), math.log(1e-8)), 20.0)
            k, lam = (vespo_k_pos, vespo_lambda_pos) if a >= 0 else (vespo_k_neg, vespo_lambda_neg)
            lam = max(lam, 1e-4)
            try:  # the gamma weight, phi(1) = 1; TRL counts a weight that overflows as 0
                phi = math.exp(lam) * math.exp(log_w) ** k * math.exp(-lam * math.exp(log_w))
            except OverflowError:
                phi = 0.0
            term = -phi * a * lp
        else:
            unclipped = (w if delta is None else torch.clamp(w, max=delta)) * a
            term = -torch.minimum(unclipped, torch.clamp(w, 1 - epsilon_low, 1 + epsilon_high) * a)
        if entropy_mask is not None:
            term = term * entropy_mask[i][m]
        if beta:
            d = ref[i][m] - lp
            kl = torch.exp(d) - d - 1
            term = term + beta * (kl * w if use_bias_correction_kl else kl)
        row_sums.append(term.sum() + zero)
        lengths.append(length)
    total = sum(row_sums, zero)
    if loss_type in ("grpo", "sapo"):
        return sum((s / max(length, 1) for s, length in zip(row_sums, lengths)), zero) / n
    if loss_type == "bnpo":
        return total / max(sum(lengths), 1)
    if loss_type == "dr_grpo":
        return total / (n * max_completion_length)
    if loss_type == "luspo":
        return total / n
    return total / num_items_in_batch


# --------------------------------------------------------------------------------------------
# TRL's own implementation
# --------------------------------------------------------------------------------------------


class _OneProcess:
    """Accelerate's collectives on a single process."""

    num_processes = 1

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    def gather(self, tensor):
        return tensor

    def reduce(self, tensor, reduction="sum"):
        return tensor


@pytest.fixture(scope="module")
def trl_trainer():
    """A factory of bare GRPOTrainer instances (importing TRL takes seconds: once per module)."""
    from trl import GRPOTrainer

    def make(*, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, beta=0.0, importance_sampling_level="token",
             top_entropy_quantile=1.0, gradient_accumulation_steps=1, vllm_importance_sampling_correction=False,
             **args):
        trainer = object.__new__(GRPOTrainer)
        trainer.__dict__.update(
            loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
            importance_sampling_level=importance_sampling_level, top_entropy_quantile=top_entropy_quantile,
            max_completion_length=MAX_LEN, off_policy_mask_threshold=None, use_vllm=vllm_importance_sampling_correction,
            vllm_importance_sampling_correction=vllm_importance_sampling_correction, aux_loss_enabled=False,
            _entropy_bonus_enabled=False,
            current_gradient_accumulation_steps=gradient_accumulation_steps,
            model=SimpleNamespace(training=True), accelerator=_OneProcess(), _metrics={"train": defaultdict(list)},
            # TRL's default steps_per_generation is gradient_accumulation_steps.
            args=SimpleNamespace(**{**ARGS_DEFAULTS, **args}, steps_per_generation=gradient_accumulation_steps))
        return trainer

    return make


def _trl_loss(make_trainer, logps, old, ref, adv, mask, entropies, *, num_items_in_batch,
              importance_sampling_ratio=None, **options):
    """(loss, d loss / d logps, metrics) from TRL's _compute_loss on these tensors; with
    ``importance_sampling_ratio``, under use_vllm and vllm_importance_sampling_correction."""
    trainer = make_trainer(vllm_importance_sampling_correction=importance_sampling_ratio is not None, **options)
    x = logps.clone().requires_grad_(True)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (x, entropies, None)
    n, t = mask.shape
    inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask.int(),
              "advantages": adv, "num_items_in_batch": torch.tensor(num_items_in_batch)}
    if old is not None:
        inputs["old_per_token_logps"] = old
    if options.get("beta", 0.0) != 0.0:
        inputs["ref_per_token_logps"] = ref
    if importance_sampling_ratio is not None:
        inputs["importance_sampling_ratio"] = importance_sampling_ratio
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    return loss.detach(), x.grad, {name: values[-1] for name, values in trainer._metrics["train"].items()}


def _ours(logps, old, ref, adv, mask, **options):
    """(loss, d loss / d logps, metrics) from grpo_loss."""
    x = logps.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, old, ref, adv, mask, max_completion_length=MAX_LEN, **options)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _close(actual, expected):
    # TRL builds sapo's temperatures in float32 (torch.where of Python floats), 1.05 to ~5e-8.
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# Every loss type with every option: independent computation and TRL
# --------------------------------------------------------------------------------------------

KL = dict(beta=0.04)
KL_CORRECTED = dict(beta=0.04, use_bias_correction_kl=True)
# cispo's epsilon_high is the weight's cap (TRL's default 0.2 would cap every token): 1.2 caps some.
TYPE_OPTIONS = {name: dict(epsilon_low=0.2, epsilon_high=0.28) for name in LOSS_TYPES}
TYPE_OPTIONS["cispo"] = dict(epsilon_high=1.2)
CASES = [
    *[(name, {**level, **kl}) for name in LOSS_TYPES
      for level in ({}, dict(importance_sampling_level="sequence"))
      for kl in ({}, KL, KL_CORRECTED)],
    *[(name, dict(delta=1.3, **kl)) for name in SURROGATE_TYPES for kl in ({}, KL)],
    ("grpo", dict(importance_sampling_level="sequence", delta=1.05)),
    ("sapo", dict(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0)),
    ("sapo", dict(sapo_temperature_pos=3.0, sapo_temperature_neg=0.7, **KL_CORRECTED)),
    ("vespo", dict(vespo_k_pos=1.5, vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=6.0)),
    ("vespo", dict(vespo_k_pos=3.0, vespo_lambda_pos=1.25, vespo_k_neg=0.5, vespo_lambda_neg=1.0, **KL)),
    *[(name, dict(on_policy=True, **KL_CORRECTED)) for name in LOSS_TYPES],
    *[(name, dict(top_entropy_quantile=0.2, **KL)) for name in LOSS_TYPES],
    ("grpo", dict(top_entropy_quantile=0.5, importance_sampling_level="sequence")),
]


def _case_id(case):
    name, options = case
    return "-".join([name, *(f"{k}={v}" for k, v in options.items())])


def _inputs(case, empty_row=True):
    """(tensors, our options, TRL's options) of a case; num_items_in_batch = this batch's tokens."""
    name, options = case
    options = {**TYPE_OPTIONS[name], **options}
    logps, old, ref, adv, mask, entropies = _batch(empty_row=empty_row)
    if options.pop("on_policy", False):
        old = None
    quantile = options.pop("top_entropy_quantile", 1.0)
    ours = dict(loss_type=name, num_items_in_batch=int(mask.sum()), **options)
    if quantile < 1.0:
        ours["entropy_mask"] = high_entropy_mask(entropies, mask, quantile)
    trl = dict(loss_type=name, top_entropy_quantile=quantile, **options)
    # Without a KL term TRL reads no reference (and reports no kl); neither do we then.
    ref = ref if options.get("beta", 0.0) else None
    return (logps, old, ref, adv, mask, entropies), ours, trl


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grpo_loss_matches_the_independent_computation(case):
    (logps, old, ref, adv, mask, _), options, _ = _inputs(case)
    loss, grad, _ = _ours(logps, old, ref, adv, mask, **options)
    y = logps.clone().requires_grad_(True)
    expected = _reference_loss(y, old, ref, adv, mask, max_completion_length=MAX_LEN, **options)
    expected.backward()
    _close(loss, expected.detach())
    _close(grad, y.grad)
    assert torch.all(grad[~mask] == 0)


@pytest.mark.parametrize("empty_row", [False, True], ids=["ragged", "with-empty-row"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grpo_loss_matches_trl(case, empty_row, trl_trainer):
    (logps, old, ref, adv, mask, entropies), options, trl_options = _inputs(case, empty_row)
    loss, grad, metrics = _ours(logps, old, ref, adv, mask, **options)
    trl_loss, trl_grad, trl_metrics = _trl_loss(trl_trainer, logps, old, ref, adv, mask, entropies,
                                                num_items_in_batch=options["num_items_in_batch"], **trl_options)
    _close(loss, trl_loss)
    _close(grad, trl_grad)
    # TRL's names; it also logs entropy (the trainer logs its own) and per-sequence clip extremes.
    assert set(metrics) == set(trl_metrics) - {"entropy", "clip_ratio/low_min", "clip_ratio/high_max"}
    per_sequence = options.get("importance_sampling_level") == "sequence" or case[0] == "vespo"
    if empty_row and per_sequence:
        # TRL averages per-sequence metrics over every row, empty ones included (see
        # test_per_sequence_metrics_skip_empty_completions); the values differ by design.
        return
    assert metrics == pytest.approx({k: trl_metrics[k] for k in metrics}, rel=1e-5, abs=1e-9)


def test_the_random_batch_reaches_every_branch():
    """The comparisons above mean something only if the ratios hit the clips."""
    logps, old, ref, adv, mask, entropies = _batch()
    for level in ("token", "sequence"):
        _, metrics = grpo_loss(logps, old, None, adv, mask, epsilon_high=0.28, importance_sampling_level=level)
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0, level
    ratio = torch.exp(logps - old)[mask]
    negative = (adv.unsqueeze(1).expand_as(mask) < 0)[mask]
    assert torch.any(negative & (ratio > 1.3)), "delta=1.3 caps some token"
    _, cispo = grpo_loss(logps, old, None, adv, mask, loss_type="cispo", epsilon_high=1.2)
    assert 0 < cispo["cispo_clip_ratio"] < 1
    seq_log_ratio = (logps - old).masked_fill(~mask, 0).sum(-1)[mask.any(-1)]
    assert seq_log_ratio.min() < -1 and seq_log_ratio.max() > 1, "VESPO's gamma weight on both sides of w = 1"
    kept = high_entropy_mask(entropies, mask, 0.2)
    assert 0 < kept.sum() < mask.sum()


@pytest.mark.parametrize("params", [
    # Token log-ratio 30 (clamped to 20), sequence sums -30 and 25 (clamped to log 1e-8 and 20),
    # lambda 0 (floored at 1e-4).
    dict(vespo_k_pos=1.0, vespo_lambda_pos=0.0, vespo_k_neg=0.5, vespo_lambda_neg=2.0),
    # w^k overflows (exp(800)): the weight becomes 0 instead of inf.
    dict(vespo_k_pos=80.0, vespo_lambda_pos=1e-4, vespo_k_neg=3.0, vespo_lambda_neg=2.0),
], ids=["clamps", "overflow"])
def test_vespo_extreme_ratios_match_trl(params, trl_trainer):
    log_ratio = torch.tensor([[30.0, -15.0, 0.0], [-10.0, -10.0, -10.0], [15.0, 10.0, 0.0], [4.0, 3.0, 3.0]],
                             dtype=torch.float64)
    logps = -1 - torch.rand(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    old, adv, mask = logps - log_ratio, torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64), torch.ones(4, 3) > 0
    options = dict(loss_type="vespo", **params)
    loss, grad, metrics = _ours(logps, old, None, adv, mask, num_items_in_batch=12, **options)
    y = logps.clone().requires_grad_(True)
    expected = _reference_loss(y, old, None, adv, mask, num_items_in_batch=12, **options)
    expected.backward()
    trl_loss, trl_grad, trl_metrics = _trl_loss(trl_trainer, logps, old, None, adv, mask, torch.zeros(4, 3),
                                                num_items_in_batch=12, **options)
    assert torch.isfinite(loss) and grad.abs().max() > 1e-3
    for value, gradient in ((expected.detach(), y.grad), (trl_loss, trl_grad)):
        _close(loss, value)
        _close(grad, gradient)
    assert metrics["vespo/phi_seq_mean"] == pytest.approx(trl_metrics["vespo/phi_seq_mean"])


# --------------------------------------------------------------------------------------------
# The sampler's importance-sampling correction: sampling_weights against TRL's
# inputs["importance_sampling_ratio"] under use_vllm and vllm_importance_sampling_correction
# --------------------------------------------------------------------------------------------

# Token-level ratios for every type, sequence-level ones (N, 1) for those TRL allows them with
# (all but vespo, which TRL restricts to the token_* modes).
SAMPLING_CASES = [
    *[(name, {**level, **kl, "per_sequence": per_sequence}) for name in LOSS_TYPES
      for level in ({}, dict(importance_sampling_level="sequence")) for kl in ({}, KL_CORRECTED)
      for per_sequence in ((False,) if name == "vespo" else (False, True))],
    *[(name, dict(top_entropy_quantile=0.5, per_sequence=False, **KL)) for name in LOSS_TYPES],
]


def _sampler_ratio(mask, *, per_sequence, seed=5):
    """Random positive ratios, with some exact zeros (masked by a *_mask mode). Token ratios are 1
    at padding, as TRL's own are (exp of a zero difference): its VESPO sums their logs there too."""
    g = torch.Generator().manual_seed(seed)
    ratio = torch.rand(mask.shape[0], 1 if per_sequence else mask.shape[1], generator=g, dtype=torch.float64) * 1.5
    ratio = (ratio + 0.25).masked_fill(torch.rand(ratio.shape, generator=g) < 0.15, 0.0)
    return ratio if per_sequence else torch.where(mask, ratio, 1.0)


@pytest.mark.parametrize("case", SAMPLING_CASES, ids=_case_id)
def test_sampling_weights_match_trls_importance_sampling_correction(case, trl_trainer):
    name, options = case
    per_sequence = options.pop("per_sequence")
    # No empty row: TRL averages per-sequence metrics over empty rows too (see
    # test_per_sequence_metrics_skip_empty_completions), and the metrics are compared here.
    (logps, old, ref, adv, mask, entropies), ours, trl_options = _inputs((name, options), empty_row=False)
    ratio = _sampler_ratio(mask, per_sequence=per_sequence)
    assert (ratio == 0).any() and (ratio > 1).any()
    loss, grad, metrics = _ours(logps, old, ref, adv, mask, sampling_weights=ratio, **ours)
    trl_loss, trl_grad, trl_metrics = _trl_loss(trl_trainer, logps, old, ref, adv, mask, entropies,
                                                num_items_in_batch=ours["num_items_in_batch"],
                                                importance_sampling_ratio=ratio, **trl_options)
    _close(loss, trl_loss)
    _close(grad, trl_grad)
    assert metrics == pytest.approx({k: trl_metrics[k] for k in metrics}, rel=1e-5, abs=1e-9)
    # The weights really entered both: without them the loss (and VESPO's phi) differs.
    unweighted, unweighted_metrics = grpo_loss(logps, old, ref, adv, mask, max_completion_length=MAX_LEN, **ours)
    assert not torch.allclose(unweighted, trl_loss)
    if name == "vespo":
        assert unweighted_metrics["vespo/phi_seq_mean"] != pytest.approx(metrics["vespo/phi_seq_mean"])


# --------------------------------------------------------------------------------------------
# Micro-batches: LossType.global_normalizer against TRL's gradient accumulation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_losses_combine_as_in_trl(loss_type, trl_trainer):
    """Two micro-batches of 3 rows (TRL: gradient_accumulation_steps = steps_per_generation = 2,
    num_items_in_batch = the whole step's tokens): a global type's micro-batch loss is TRL's as
    it is, any other type's is TRL's times the number of micro-batches (the trainer divides)."""
    logps, old, _, adv, mask, entropies = _batch()
    options = TYPE_OPTIONS[loss_type]
    num_items = int(mask.sum())
    ga = 2
    is_global = get_loss_type(loss_type).global_normalizer
    assert is_global == (loss_type in GLOBAL_TYPES)
    for rows in (slice(0, 3), slice(3, 6)):
        part = (logps[rows], old[rows], None, adv[rows], mask[rows])
        loss, grad, _ = _ours(*part, loss_type=loss_type, num_items_in_batch=num_items, **options)
        trl_loss, trl_grad, _ = _trl_loss(trl_trainer, *part, entropies[rows], num_items_in_batch=num_items,
                                          loss_type=loss_type, gradient_accumulation_steps=ga, **options)
        scale = 1 if is_global else ga
        _close(loss / scale, trl_loss)
        _close(grad / scale, trl_grad)


# --------------------------------------------------------------------------------------------
# The registry: one record per loss type
# --------------------------------------------------------------------------------------------


def test_each_loss_type_is_one_record():
    objectives = {"cispo": cispo_objective, "sapo": sapo_objective, "vespo": vespo_objective}
    for name in LOSS_TYPES:
        record = get_loss_type(name)
        assert record.name == name
        assert record.objective is objectives.get(name, clipped_surrogate_objective)
        assert record.global_normalizer == (name in GLOBAL_TYPES)
        assert record.folds_sampling_weights == (name == "vespo")  # TRL's `loss_type != "vespo"`
    # Shared reductions: sapo reduces as grpo, cispo and vespo as dapo (as TRL does).
    assert get_loss_type("sapo").reduce is get_loss_type("grpo").reduce
    assert get_loss_type("cispo").reduce is get_loss_type("dapo").reduce is get_loss_type("vespo").reduce


def test_register_loss_type_with_an_objective(monkeypatch):
    monkeypatch.setattr(losses, "_LOSS_TYPES", dict(losses._LOSS_TYPES))
    monkeypatch.setattr(losses, "LOSS_TYPES", losses.LOSS_TYPES)

    def reinforce(*, logps, advantages, mask, **_):
        return -advantages * logps, {"rows": mask.any(-1, keepdim=True).float()}

    register_loss_type("reinforce", global_normalizer=True, objective=reinforce)(get_loss_type("dapo").reduce)
    assert losses.LOSS_TYPES[-1] == "reinforce" and get_loss_type("reinforce").global_normalizer
    logps, old, _, adv, mask, _ = _batch()
    x = logps.clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, old, None, adv, mask, loss_type="reinforce", num_items_in_batch=40)
    loss.backward()
    torch.testing.assert_close(loss, -(adv.unsqueeze(1) * logps)[mask].sum() / 40)
    torch.testing.assert_close(x.grad, torch.where(mask, -adv.unsqueeze(1) / 40, 0.0))
    assert metrics == {"rows": 1.0}  # an (N, 1) metric averages over the rows with a token


# --------------------------------------------------------------------------------------------
# What the new options mean, on small cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sapo", "vespo", "cispo"])
def test_on_policy_gradient_is_the_policy_gradient(loss_type):
    # At w = 1 (mu = 1): SAPO's gate has slope 1, VESPO's phi(1) = 1, CISPO's weight is 1 (cap
    # above 1): each gradient is -A * grad logp under its reduction.
    logps, _, _, adv, mask, _ = _batch()
    x = logps.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, None, None, adv, mask, loss_type=loss_type, epsilon_high=5.0, num_items_in_batch=30)
    loss.backward()
    scale = (mask.sum(-1, keepdim=True).clamp(min=1) * len(adv)) if loss_type == "sapo" else 30
    torch.testing.assert_close(x.grad, torch.where(mask, -adv.unsqueeze(1) / scale, 0.0))


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    # w = 1.5 with A > 0: the surrogate's clip zeroes the gradient, CISPO only caps the weight.
    logps = torch.full((1, 1), math.log(1.5), requires_grad=True)
    args = (logps, torch.zeros(1, 1), None, torch.ones(1), torch.ones(1, 1, dtype=torch.bool))
    loss, metrics = grpo_loss(*args, loss_type="cispo", epsilon_high=1.2)
    (grad,) = torch.autograd.grad(loss, logps)
    assert grad.item() == pytest.approx(-1.2) and metrics["cispo_clip_ratio"] == 1.0
    (clipped,) = torch.autograd.grad(grpo_loss(*args, loss_type="dapo")[0], logps)
    assert clipped.item() == 0.0


def test_delta_bounds_negative_advantage_tokens():
    # w = 3 with A < 0: the one-sided clip leaves loss 3 and gradient 3; delta = 2 caps both.
    logps = torch.full((1, 1), math.log(3.0), requires_grad=True)
    args = (logps, torch.zeros(1, 1), None, -torch.ones(1), torch.ones(1, 1, dtype=torch.bool))
    free, _ = grpo_loss(*args)
    capped, _ = grpo_loss(*args, delta=2.0)
    assert free.item() == pytest.approx(3.0) and capped.item() == pytest.approx(2.0)
    assert torch.autograd.grad(capped, logps)[0].item() == 0.0


def test_sequence_level_uses_one_geometric_mean_ratio_per_completion():
    # Token ratios 1.5 and 1/1.5: each clipped alone, their geometric mean is 1 (no clip).
    log_ratio = math.log(1.5)
    logps = torch.tensor([[log_ratio, -log_ratio]], requires_grad=True)
    args = (logps, torch.zeros(1, 2), None, torch.ones(1), torch.ones(1, 2, dtype=torch.bool))
    _, token = grpo_loss(*args)
    loss, sequence = grpo_loss(*args, importance_sampling_level="sequence")
    assert token["clip_ratio/high_mean"] == 0.5 and sequence["clip_ratio/region_mean"] == 0.0
    # grpo: loss = -w * A with w = exp(mean log-ratio) = 1: d/dlogp_t = -1/2 each.
    assert loss.item() == pytest.approx(-1.0)
    torch.testing.assert_close(torch.autograd.grad(loss, logps)[0], torch.tensor([[-0.5, -0.5]]))


def test_bias_corrected_kl_weighs_k3_by_the_ratio():
    logps, old, ref, adv, mask, _ = _batch()
    kwargs = dict(beta=1.0, loss_type="bnpo")
    plain, plain_metrics = grpo_loss(logps, old, ref, torch.zeros_like(adv), mask, **kwargs)
    corrected, metrics = grpo_loss(logps, old, ref, torch.zeros_like(adv), mask, use_bias_correction_kl=True, **kwargs)
    d = (ref - logps)[mask]
    k3, w = torch.exp(d) - d - 1, torch.exp(logps - old)[mask]
    torch.testing.assert_close(plain, k3.mean())
    torch.testing.assert_close(corrected, (k3 * w).mean())
    assert metrics["kl"] == pytest.approx((k3 * w).mean().item()) and plain_metrics["kl"] != metrics["kl"]


def test_entropy_mask_drops_tokens_from_the_policy_term_only():
    logps, old, ref, adv, mask, entropies = _batch()
    keep = high_entropy_mask(entropies, mask, 0.3)
    x = logps.clone().requires_grad_(True)
    loss, _ = grpo_loss(x, old, ref, adv, mask, loss_type="bnpo", beta=0.1, entropy_mask=keep)
    loss.backward()
    dropped = mask & ~keep
    kl_grad = 0.1 * (1 - torch.exp(ref - logps)) / mask.sum()  # d/dlogp of beta * k3, over all valid tokens
    # A dropped token's gradient is its KL term's alone; a kept one also has its policy term.
    torch.testing.assert_close(x.grad[dropped], kl_grad[dropped])
    assert dropped.any() and not torch.allclose(x.grad[keep], kl_grad[keep])


def test_per_sequence_metrics_skip_empty_completions():
    # Rows 0 and 1 have tokens, row 2 none: a per-sequence metric averages over rows 0 and 1
    # (TRL divides by all 3 rows, and VESPO's phi of an empty row, 1, would count).
    logps = torch.tensor([[math.log(2.0), 0.0], [0.0, 0.0], [5.0, 5.0]])
    mask = torch.tensor([[True, False], [True, True], [False, False]])
    adv = torch.tensor([1.0, 1.0, 1.0])
    _, metrics = grpo_loss(logps, torch.zeros(3, 2), None, adv, mask, importance_sampling_level="sequence")
    assert metrics["clip_ratio/high_mean"] == 0.5
    _, vespo = grpo_loss(logps, torch.zeros(3, 2), None, adv, mask, loss_type="vespo")
    phi_of_2 = math.exp(3.0) * 2.0 ** 2 * math.exp(-3.0 * 2.0)
    assert vespo["vespo/phi_seq_mean"] == pytest.approx((phi_of_2 + 1.0) / 2)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_values_do_not_leak_with_the_new_options(loss_type):
    logps, old, ref, adv, mask, entropies = _batch()
    options = dict(loss_type=loss_type, beta=0.1, importance_sampling_level="sequence", use_bias_correction_kl=True,
                   entropy_mask=high_entropy_mask(entropies, mask, 0.5), max_completion_length=MAX_LEN)
    noisy = logps.masked_fill(~mask, float("nan")).requires_grad_(True)
    loss, metrics = grpo_loss(noisy, old.masked_fill(~mask, float("inf")), ref, adv, mask, **options)
    clean, clean_metrics = grpo_loss(logps, old, ref, adv, mask, **options)
    torch.testing.assert_close(loss, clean)
    assert metrics == pytest.approx(clean_metrics)
    loss.backward()
    assert torch.isfinite(noisy.grad).all() and torch.all(noisy.grad[~mask] == 0)


def test_new_option_errors():
    logps, mask, adv = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(2)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logps, None, None, adv, mask, importance_sampling_level="group")
    with pytest.raises(ValueError, match="entropy_mask"):
        grpo_loss(logps, None, None, adv, mask, entropy_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="quantile"):
        high_entropy_mask(logps, mask, 1.5)


# --------------------------------------------------------------------------------------------
# The trainer's masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("empty_row", [False, True])
def test_high_entropy_mask_matches_trl(quantile, empty_row, trl_trainer):
    _, _, _, _, mask, entropies = _batch(empty_row=empty_row)
    kept = high_entropy_mask(entropies, mask, quantile)
    # TRL's _compute_loss asks for the (1 - top_entropy_quantile)-quantile.
    expected = trl_trainer().get_high_entropy_mask(entropies, mask.int(), 1 - quantile)
    assert kept.dtype == torch.bool and torch.equal(kept, expected)
    # Independently: padding is never kept, and the kept tokens are the top of the valid ones:
    # none dropped has a higher entropy than one kept, and at least quantile * (n - 1) are kept.
    assert not kept[~mask].any()
    dropped = mask & ~kept
    if kept.any() and dropped.any():
        assert entropies[dropped].max() < entropies[kept].min()
    n = int(mask.sum())
    assert kept.sum() >= math.floor(quantile * (n - 1))
    if quantile == 1.0:
        assert torch.equal(kept, mask)
    if quantile == 0.0:
        assert torch.equal(kept, mask & (entropies == entropies[mask].max()))


def test_high_entropy_mask_edge_cases(trl_trainer):
    entropies = torch.tensor([[0.5, 0.5, 0.1], [2.0, 9.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # The highest valid entropy is 2.0 (9.0 is padding): quantile 0 keeps just that token.
    assert torch.equal(high_entropy_mask(entropies, mask, 0.0), torch.tensor([[False, False, False], [True, False, False]]))
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert torch.equal(high_entropy_mask(entropies, none, 0.2), none)
    assert torch.equal(trl_trainer().get_high_entropy_mask(entropies, none, 0.8), none)


def test_truncated_completion_mask_is_trls_mask_truncated_completions():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    terminated = torch.tensor([True, False, True])
    masked = truncated_completion_mask(mask, terminated)
    # TRL's _generate_and_score_completions, verbatim (is_truncated: last id neither EOS nor pad).
    is_truncated = ~terminated
    assert torch.equal(masked, mask * (~is_truncated).unsqueeze(1).int())
    assert masked.dtype == mask.dtype
    assert torch.equal(truncated_completion_mask(mask.bool(), terminated), masked.bool())
    # A truncated completion then leaves the loss: its advantage changes nothing.
    logps = -torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, _ = grpo_loss(logps, None, None, adv, masked, loss_type="dapo")
    other, _ = grpo_loss(logps, None, None, torch.tensor([1.0, 7.0, 0.5]), masked, loss_type="dapo")
    torch.testing.assert_close(loss, other)
