"""Wiring tests: does every training knob reach the computation it names?

The unit tests check the pure pieces (grpo_fast.losses, the log-prob kernels, the sampler against
HF `generate`) and the end-to-end tests check that runs finish and write what they should. Neither
notices a knob that is parsed and validated but never reaches the update: a log-prob pass scored
at temperature 1 instead of `online.temperature`, `online.beta` or `offline.beta` dropped,
`epsilon_high` swapped for `epsilon_low`, `scale_rewards` ignored, an optimizer state not
restored on --resume. Training still runs, the loss still goes down, and every metric looks
plausible. So these tests pin behaviour, from the public entry points only:

* one online step (`OnlineTrainer.step`, rollout fixed by replacing `generate`, rewards from a
  reward function we control) must move the weights and the AdamW moments exactly as the same
  update computed independently: the model's own logits at the temperature, the pure
  `grpo_loss` / `group_advantages`, `torch.optim.AdamW`. Non-default values everywhere, and
  mu = 2 so that the ratios leave 1 and the clip range matters;
* the same for an offline step (`grpo_fast.cli.train`, HF `Trainer`) with `offline.beta`;
* the sampler draws from softmax(logits / T), measured at two temperatures;
* a run interrupted at step 2 of 4 and resumed ends bit-identical (weights, AdamW moments and
  step counts, scheduler) to a straight run: online (full fine-tune and LoRA) and offline;
* a short online run raises its mean reward, a short offline run its held-out pairwise accuracy.

Why relative errors of whole updates rather than elementwise tolerances: Adam's first update is
about lr * g / (|g| + eps), so a coordinate whose gradient is ~1e-7 turns float rounding (the
trainer's fused kernel and shared-prompt forward vs the plain forward here) into a visible
difference in that one coordinate. Summed over the whole update the rounding stays ~1e-5 of its
norm, while each wiring bug above moves it by 3% or more.

    pytest tests/test_wiring.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from grpo_fast import rewards
from grpo_fast.config import config_from_dict, load_config
from grpo_fast.data import GroupCollator, load_offline_dataset
from grpo_fast.evaluate import evaluate
from grpo_fast.listwise import listwise_kl_loss
from grpo_fast.losses import group_advantages, grpo_loss, sampling_importance_weights
from grpo_fast.modeling import load_model_and_tokenizer
from grpo_fast.online import OnlineTrainer
from grpo_fast.rollout import Rollout
from grpo_fast.cli import train
from grpo_fast.offline import OfflineGRPOTrainer

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = str(ROOT / "configs" / "models" / "tiny-llama.json")
PROMPTS = ["ab=", "cdef=", "g=", "hi="]
# Relative error bounds (see the module docstring): rounding gives ~1e-5, a wiring bug >= 5e-2.
UPDATE_RTOL = 1e-3
MOMENT_RTOL = 1e-4


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def head(src: Path, n: int, dst: Path) -> str:
    """The first n records of a shipped data file, so tokenizing and training stay short."""
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return str(dst)


def rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """||got - want|| / ||want|| over all tensors together."""
    assert len(got) == len(want) and want
    got = torch.cat([g.detach().flatten().double() for g in got])
    want = torch.cat([w.detach().flatten().double() for w in want])
    return ((got - want).norm() / want.norm()).item()


def plain_completion_logps(model, roll: Rollout, temperature: float) -> torch.Tensor:
    """(N, C) log-probs of the completion tokens from the model's own forward (full logits,
    log_softmax at `temperature`), zero after each completion's end: the reference the trainer's
    fused, shared-prompt log-prob path must agree with."""
    ids = torch.cat([roll.prompt_ids, roll.completion_ids], dim=1)
    attn = torch.cat([roll.prompt_mask, roll.completion_mask], dim=1)
    # Positions count from each row's first real token, as generation numbered them.
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
    P = roll.prompt_ids.size(1)
    logps = torch.log_softmax(logits[:, P - 1:-1] / temperature, dim=-1)
    logps = logps.gather(-1, roll.completion_ids.unsqueeze(-1)).squeeze(-1)
    return logps * roll.completion_mask


def fixed_rollout(tokenizer, prompts: list[str], G: int, C: int, gen: torch.Generator,
                  temperature: float) -> Rollout:
    """G random-letter completions per prompt, each prompt left-padded as the sampler does, as
    if sampled at `temperature` (the log-prob passes read it from the rollout).
    Lengths vary (the loss types normalize differently by length); a completion shorter than C
    ends with EOS, a full-length one does or not."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    P = max(len(e) for e in encoded)
    prompt_ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, e in enumerate(encoded):
        prompt_ids[i, P - len(e):] = torch.tensor(e)
        prompt_mask[i, P - len(e):] = 1
    N = len(prompts) * G
    lengths = torch.randint(1, C + 1, (N,), generator=gen)
    lengths[0] = C
    terminated = (lengths < C) | (torch.rand(N, generator=gen) < 0.5)
    columns = torch.arange(C)
    mask = (columns < lengths[:, None]).long()
    ids = torch.where(mask.bool(), torch.randint(ord("a"), ord("z") + 1, (N, C), generator=gen), pad)
    ids[terminated, lengths[terminated] - 1] = eos
    texts = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(ids.tolist(), lengths.tolist())]
    return Rollout(prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
                   completion_ids=ids, completion_mask=mask, texts=texts, terminated=terminated, lengths=lengths,
                   temperature=temperature)


# ------------------------------------------------------------------------------------------
# a. One online step against an independent computation of the same update
# ------------------------------------------------------------------------------------------

G, B, C = 4, 2, 6
ONLINE = dict(temperature=0.7, beta=0.2, epsilon_low=0.1, epsilon_high=0.4, num_iterations=2,
              use_bias_correction_kl=False)
# One total reward per completion, prompt after prompt (G each): groups of different spreads,
# so that "group", "batch" and "none" scaling weigh them differently, and one all-equal group
# (zero advantage).
REWARDS = [0.0, 1.0, 3.0, 0.5, 2.0, 2.2, 1.9, 0.1, 5.0, -1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]


# An engine's rollouts (sampler log-probs given): the correction's mode and bounds, set so that
# some weights are truncated (or masked) and the default (sequence_mask, 3.0) would differ.
ENGINE = {"vllm_importance_sampling_mode": "token_truncate", "vllm_importance_sampling_clip_max": 1.02,
          "vllm_importance_sampling_clip_min": 0.99}


@pytest.mark.parametrize("loss_type,scale_rewards,ga,lora,engine", [
    ("dapo", "none", 1, False, None),
    ("grpo", "batch", 2, False, None),
    ("bnpo", "batch", 1, True, None),
    ("dr_grpo", "none", 2, True, None),
    ("dapo", "group", 2, True, ENGINE),
    ("grpo", "none", 1, False, {**ENGINE, "vllm_importance_sampling_mode": "sequence_mask",
                                "vllm_importance_sampling_clip_max": 1.01, "vllm_importance_sampling_clip_min": None}),
], ids=["dapo-none-full", "grpo-batch-ga2-full", "bnpo-batch-lora", "dr_grpo-none-ga2-lora",
        "dapo-engine-token_truncate-ga2-lora", "grpo-engine-sequence_mask-full"])
def test_online_step_matches_independent_update(tmp_path, monkeypatch, loss_type, scale_rewards, ga, lora, engine):
    o = {**ONLINE, **(engine or {})}
    rewards_used = REWARDS[:ga * B * G]
    monkeypatch.setitem(rewards.BUILTIN_REWARDS, "wiring_table",
                        lambda prompts, completions, **kw: list(rewards_used))
    lr = 1e-2 if not lora else 3e-2
    cfg = config_from_dict({
        "mode": "online", "model_path": TINY_MODEL, "attn_implementation": "sdpa",
        "dataset_path": write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]),
        "output_dir": str(tmp_path / "run"), "seed": 0, "max_steps": 1,
        "batch_size": B, "gradient_accumulation_steps": ga, "learning_rate": lr,
        # No clipping: it would rescale the gradient and hide a wrong magnitude from the moments.
        "max_grad_norm": 0.0, "weight_decay": 0.0,
        "lora": {"enabled": lora, "r": 4, "alpha": 8},
        "online": {**o, "num_generations": G, "max_prompt_length": 8, "max_completion_length": C,
                   "loss_type": loss_type, "scale_rewards": scale_rewards,
                   "rewards": [{"name": "wiring_table"}], "log_completions_steps": 0}})
    trainer = OnlineTrainer(cfg)
    # The reference policy is the starting model; move the policy away from it so the KL term
    # (and its gradient) is not zero from the first pass on. LoRA: give lora_B a value (peft
    # starts it at 0, where the adapter is the identity).
    ref_model = copy.deepcopy(trainer.model).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=gen) * (0.05 if lora else 0.01))
    policy = copy.deepcopy(trainer.model)
    start = [p.detach().clone() for p in policy.parameters() if p.requires_grad]

    records = [{"prompt": p} for p in PROMPTS[:ga * B]]
    chunks = [PROMPTS[k * B:(k + 1) * B] for k in range(ga)]
    rolls = {tuple(c): fixed_rollout(trainer.tokenizer, c, G, C, gen, cfg.online.temperature) for c in chunks}
    if engine:
        # As if an engine had sampled them: its log-probs are the policy's, slightly off.
        for roll in rolls.values():
            with torch.no_grad():
                logps = plain_completion_logps(policy, roll, cfg.online.temperature)
            roll.sampler_logps = (logps + 0.02 * torch.randn(logps.shape, generator=gen)) * roll.completion_mask
    monkeypatch.setattr(trainer, "generate", lambda prompts: rolls[tuple(prompts)])
    metrics, _ = trainer.step(records)
    assert ("sampling/importance_sampling_ratio/clipped_fraction" in metrics) == bool(engine)
    if engine:
        assert 0 < metrics["sampling/importance_sampling_ratio/clipped_fraction"] < 1

    # The same update from the pure pieces.
    T = o["temperature"]
    advantages = group_advantages(torch.tensor(rewards_used), G, scale=scale_rewards).split(B * G)
    rolls = [rolls[tuple(c)] for c in chunks]
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with torch.no_grad():
        old = [plain_completion_logps(policy, r, T) for r in rolls]
        ref = [plain_completion_logps(ref_model, r, T) for r in rolls]
    num_items = int(sum(r.lengths.sum() for r in rolls))
    policy.train()
    between = above = 0
    for _ in range(o["num_iterations"]):
        for roll, adv, old_lp, ref_lp in zip(rolls, advantages, old, ref):
            logps = plain_completion_logps(policy, roll, T)
            weights = None
            if engine:
                weights, _ = sampling_importance_weights(
                    old_lp, roll.sampler_logps, roll.completion_mask, mode=o["vllm_importance_sampling_mode"],
                    clip_min=o["vllm_importance_sampling_clip_min"], clip_max=o["vllm_importance_sampling_clip_max"])
            loss, _ = grpo_loss(logps, old_lp, ref_lp, adv, roll.completion_mask, loss_type=loss_type,
                                epsilon_low=o["epsilon_low"], epsilon_high=o["epsilon_high"], beta=o["beta"],
                                max_completion_length=C, num_items_in_batch=num_items,
                                use_bias_correction_kl=o["use_bias_correction_kl"], sampling_weights=weights)
            # grpo, bnpo, dr_grpo normalize per micro-batch (the step averages them); dapo by the
            # step's token count already.
            (loss if loss_type == "dapo" else loss / ga).backward()
            ratio = (logps - old_lp).exp().detach()
            up = roll.completion_mask.bool() & (adv[:, None] > 0)
            between += int((up & (ratio > 1 + o["epsilon_low"]) & (ratio < 1 + o["epsilon_high"])).sum())
            above += int((up & (ratio >= 1 + o["epsilon_high"])).sum())
        opt.step()
        opt.zero_grad(set_to_none=True)
    # The set-up exercises the asymmetric clip: positive-advantage tokens inside
    # (1 + eps_low, 1 + eps_high), which only the right upper bound leaves unclipped, and some
    # beyond 1 + eps_high, which it clips.
    assert between > 0 and above > 0, (between, above)

    got = [p for p in trainer.model.parameters() if p.requires_grad]
    assert len(got) == len(params)
    err = rel_err([g - s for g, s in zip(got, start)], [p - s for p, s in zip(params, start)])
    assert err < UPDATE_RTOL, f"weights after the step differ from the independent update: {err:.3g}"
    for key in ("exp_avg", "exp_avg_sq"):
        err = rel_err([trainer.optimizer.state[p][key] for p in got], [opt.state[p][key] for p in params])
        assert err < MOMENT_RTOL, f"AdamW {key} differs from the independent update's: {err:.3g}"
    steps = {float(trainer.optimizer.state[p]["step"]) for p in got}
    assert steps == {float(o["num_iterations"])}, "one optimizer update per pass over the rollout"


# ------------------------------------------------------------------------------------------
# The offline step (HF Trainer) against an independent computation, offline.beta > 0
# ------------------------------------------------------------------------------------------


def plain_group_logps(model, batch: dict, normalize: bool) -> torch.Tensor:
    """(B, K) sequence log-probs of a GroupCollator batch from the model's own full logits."""
    sel = batch["group_mask"]
    ids, attn, comp = batch["input_ids"][sel], batch["attention_mask"][sel], batch["completion_mask"][sel]
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = comp[:, 1:].float()
    seq = (logps * mask).sum(dim=1)
    if normalize:
        seq = seq / mask.sum(dim=1)
    return torch.zeros(sel.shape).masked_scatter(sel, seq)


def test_offline_steps_match_independent_update(tmp_path):
    groups = 6
    data = head(ROOT / "data" / "arithmetic_train.jsonl", groups, tmp_path / "train.jsonl")
    off = {"beta": 0.5, "policy_temperature": 2.0, "score_temperature": 0.5, "kl_direction": "reverse",
           "length_normalize": True}
    base = {"mode": "offline", "model_path": TINY_MODEL, "attn_implementation": "sdpa", "dataset_path": data,
            "max_seq_length": 24, "seed": 0, "lora": {"r": 4, "alpha": 8},
            # One batch holds every group, so HF's shuffling only reorders the batch (the loss is
            # a mean over groups); no clipping, weight decay or schedule to reproduce.
            "batch_size": groups, "max_steps": 2, "learning_rate": 1e-2, "max_grad_norm": 0.0,
            "weight_decay": 0.0, "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 10}
    # Start from an adapter that is not the identity: with peft's lora_B = 0 the policy equals
    # the reference (the adapter switched off) and the beta term has no gradient at step 1.
    model, tok = load_model_and_tokenizer(config_from_dict({**base, "output_dir": str(tmp_path / "x")}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(tmp_path / "adapter0")
    start = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    out = tmp_path / "run"
    train(config_from_dict({**base, "output_dir": str(out), "lora_path": str(tmp_path / "adapter0"), "offline": off}))

    ds = load_offline_dataset(data, tok, base["max_seq_length"])
    batch = GroupCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=base["learning_rate"], weight_decay=0.0)
    model.train()
    for _ in range(base["max_steps"]):
        seq = plain_group_logps(model, batch, normalize=True)
        loss = listwise_kl_loss(seq, batch["scores"], batch["group_mask"], policy_temperature=2.0,
                                score_temperature=0.5, direction="reverse")
        with torch.no_grad(), model.disable_adapter():
            ref = plain_group_logps(model, batch, normalize=True)
        # KL(p_ref || p) between the reference's and the policy's group distributions, both at
        # the policy temperature.
        loss = loss + off["beta"] * listwise_kl_loss(seq, ref, batch["group_mask"], policy_temperature=2.0,
                                                     score_temperature=2.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    want = get_peft_model_state_dict(model)
    got = load_file(out / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    err = rel_err([got[k] - start[k] for k in want], [want[k] - start[k] for k in want])
    assert err < UPDATE_RTOL, f"adapter after 2 offline steps differs from the independent update: {err:.3g}"


# ------------------------------------------------------------------------------------------
# b. The sampler draws from softmax(logits / T)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampler_follows_the_temperature(tmp_path, temperature):
    """Through the trainer's own rollout (config -> sampler): the first tokens of many samples
    must follow softmax(logits / T) for the configured T, and not the T = 1 distribution."""
    samples = 4000
    cfg = config_from_dict({
        "mode": "online", "model_path": TINY_MODEL, "attn_implementation": "sdpa", "seed": 0,
        "dataset_path": write_jsonl(tmp_path / "p.jsonl", [{"prompt": "c="}]), "output_dir": str(tmp_path / "run"),
        "lora": {"enabled": False},
        "online": {"num_generations": samples, "max_prompt_length": 8, "max_completion_length": 1,
                   "temperature": temperature, "beta": 0.0, "rewards": [{"name": "exact_match"}]}})
    trainer = OnlineTrainer(cfg)
    # A random-weight model is nearly uniform, where temperature hardly shows: scaling the final
    # norm multiplies the logits by 10 (top token ~0.16 at T = 1, 0.47 at T = 0.5, 0.04 at T = 2).
    with torch.no_grad():
        trainer.model.get_decoder().norm.weight.mul_(10.0)
    torch.manual_seed(0)
    roll = trainer.generate(["c="])
    assert roll.temperature == temperature, "the rollout carries its sampling temperature to scoring"
    first = roll.completion_ids[:, 0]
    with torch.no_grad():
        logits = trainer.model(input_ids=roll.prompt_ids[:1], attention_mask=roll.prompt_mask[:1]).logits[0, -1].float()

    def chi2(probs: torch.Tensor) -> float:
        """Pearson chi-square of the sample against `probs`, binned as the 5 most likely tokens
        and the rest (df = 5)."""
        top = probs.topk(5).indices
        expected = torch.cat([probs[top], (1 - probs[top].sum()).reshape(1)]) * samples
        counts = torch.stack([(first == t).sum() for t in top]).float()
        observed = torch.cat([counts, (samples - counts.sum()).reshape(1)])
        return ((observed - expected) ** 2 / expected).sum().item()

    # df = 5: P(chi2 > 30) ~ 1.5e-5. The T = 1 distribution scores in the hundreds or more.
    assert chi2((logits / temperature).softmax(-1)) < 30
    assert chi2(logits.softmax(-1)) > 100, "the set-up must tell T from 1"


# ------------------------------------------------------------------------------------------
# c. Interrupted at step 2 of 4 and resumed == a straight 4-step run
# ------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Stands for a kill after the step-2 checkpoint."""


class Interrupter:
    """Wraps cls.method to count its calls and raise Interrupted on call `limit` + 1 (never once
    `limit` is None): a run killed after its step-2 checkpoint, at the next step."""

    def __init__(self, monkeypatch, cls, method: str, limit: int):
        real = getattr(cls, method)
        self.calls, self.limit = 0, limit

        def wrapped(obj, *args, **kwargs):
            self.calls += 1
            if self.limit is not None and self.calls > self.limit:
                raise Interrupted()
            return real(obj, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapped)

    def disarm(self) -> None:
        self.calls, self.limit = 0, None


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Weights, optimizer state (moments and step counts, param groups) and scheduler state
    equal, bit for bit."""
    weights = sorted(p.name for p in a.glob("*.safetensors") if "rng" not in p.name)
    assert weights and weights == sorted(p.name for p in b.glob("*.safetensors") if "rng" not in p.name)
    for name in weights:
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}: {k}"
    for name in ("optimizer.pt", "scheduler.pt"):
        sa = torch.load(a / name, weights_only=True)
        sb = torch.load(b / name, weights_only=True)
        assert_same_state(sa, sb, name)


def assert_same_state(x, y, where: str) -> None:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert isinstance(y, dict) and x.keys() == y.keys(), where
        for k in x:
            assert_same_state(x[k], y[k], f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):
        assert isinstance(y, (list, tuple)) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same_state(u, v, f"{where}[{i}]")
    else:
        assert x == y, f"{where}: {x!r} != {y!r}"


def optimizer_has_moments(ckpt: Path) -> None:
    """The compared state is not vacuous: AdamW moments of every parameter, after 4 steps."""
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert state and all({"exp_avg", "exp_avg_sq", "step"} <= s.keys() for s in state.values())
    assert all(s["exp_avg"].abs().sum() > 0 for s in state.values())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_online_resume_equals_straight_run(tmp_path, monkeypatch, lora):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"{w}=", "answer": w} for w in ("ab", "cd", "efg", "h")])

    def cfg(out):
        return config_from_dict({
            "mode": "online", "model_path": TINY_MODEL, "attn_implementation": "sdpa", "dataset_path": data,
            "output_dir": str(out), "seed": 0, "batch_size": 2, "max_steps": 4, "save_steps": 2,
            "save_total_limit": 2, "logging_steps": 1, "learning_rate": 1e-2,
            # A schedule that moves, so the scheduler's position matters too.
            "lr_scheduler_type": "cosine", "warmup_ratio": 0.25,
            "lora": {"enabled": lora, "r": 4, "alpha": 8},
            "online": {"num_generations": 4, "max_prompt_length": 8, "max_completion_length": 4,
                       "beta": 0.1, "num_iterations": 2, "log_completions_steps": 0,
                       "rewards": [{"name": "grpo_fast.tasks:char_match"}]}})

    assert_resume_equals_straight(cfg, tmp_path, monkeypatch, OnlineTrainer, "step")


def test_offline_resume_equals_straight_run(tmp_path, monkeypatch):
    data = head(ROOT / "data" / "arithmetic_train.jsonl", 32, tmp_path / "train.jsonl")

    def cfg(out):
        return config_from_dict({
            "mode": "offline", "model_path": TINY_MODEL, "attn_implementation": "sdpa", "dataset_path": data,
            "output_dir": str(out), "max_seq_length": 24, "seed": 0, "batch_size": 4, "max_steps": 4,
            "save_steps": 2, "save_total_limit": 2, "logging_steps": 1, "learning_rate": 1e-2,
            "lr_scheduler_type": "cosine", "warmup_ratio": 0.25, "lora": {"r": 4, "alpha": 8},
            "offline": {"beta": 0.1}})

    assert_resume_equals_straight(cfg, tmp_path, monkeypatch, OfflineGRPOTrainer, "compute_loss")


def assert_resume_equals_straight(cfg, tmp_path, monkeypatch, trainer_cls, method) -> None:
    """A 4-step run straight, and one interrupted in step 3 (at `trainer_cls.method`'s third
    call) then resumed: the resumed run makes the 2 steps left, and its checkpoint-4 (weights,
    optimizer and scheduler states) is the straight run's."""
    train(cfg(tmp_path / "straight"))
    calls = Interrupter(monkeypatch, trainer_cls, method, 2)
    with pytest.raises(Interrupted):
        train(cfg(tmp_path / "resumed"))
    calls.disarm()
    train(cfg(tmp_path / "resumed"), resume=True)
    assert calls.calls == 2, "the resumed run must continue at step 3, not start over"
    optimizer_has_moments(tmp_path / "straight" / "checkpoint-4")
    assert_same_checkpoint(tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")


# ------------------------------------------------------------------------------------------
# d. Short runs learn
# ------------------------------------------------------------------------------------------


def test_online_run_raises_the_mean_reward(tmp_path):
    """configs/tiny-online.yaml on 8 of its 26 letters, 60 steps (~5 s): the mean reward of the
    last 10 steps must clearly beat that of the first 10 (about 0.03 -> 0.3)."""
    letters = head(ROOT / "data" / "repeat_letters.jsonl", 8, tmp_path / "letters.jsonl")
    cfg = load_config(ROOT / "configs" / "tiny-online.yaml", [
        f"model_path={TINY_MODEL}", f"dataset_path={letters}", f"output_dir={tmp_path / 'run'}",
        "max_steps=60", "batch_size=8", "learning_rate=3e-3", "logging_steps=1", "save_steps=1000",
        "online.eval_steps=0", "online.log_completions_steps=0"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reward = [r["reward"] for r in rows if "reward" in r]
    assert len(reward) == 60
    first, last = sum(reward[:10]) / 10, sum(reward[-10:]) / 10
    assert last > first + 0.15, (first, last)


def test_offline_run_raises_heldout_pairwise_accuracy(tmp_path):
    """configs/tiny-offline.yaml on 480 training groups, one epoch (30 steps, ~4 s): held-out
    pairwise accuracy (grpo_fast.evaluate, 150 groups, ~2,000 pairs) must beat the base model's
    (about 0.65 -> 0.75)."""
    train_data = head(ROOT / "data" / "arithmetic_train.jsonl", 480, tmp_path / "train.jsonl")
    eval_data = head(ROOT / "data" / "arithmetic_eval.jsonl", 150, tmp_path / "eval.jsonl")
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "tiny-offline.yaml", [
        f"model_path={TINY_MODEL}", f"dataset_path={train_data}", f"eval_dataset_path={eval_data}",
        f"output_dir={out}", "num_epochs=1", "save_steps=1000"])
    train(cfg)
    results = evaluate(cfg, adapter=str(out), output=str(tmp_path / "eval.json"))
    base, trained = results["base (adapter off)"], results[str(out)]
    assert base["groups"] == trained["groups"] == 150
    # The accuracy over ~2,000 pairs has a standard error of ~0.01.
    assert trained["pairwise_accuracy"] > base["pairwise_accuracy"] + 0.05, (base, trained)


def test_every_loss_option_reaches_grpo_loss(tmp_path, monkeypatch):
    """Each TRL-named loss option of the config arrives at grpo_loss as set (their formulas are
    held to TRL's in tests/test_losses_trl.py), and mask_truncated_completions and
    top_entropy_quantile shape the masks it gets."""
    from grpo_fast import online

    options = {"loss_type": "sapo", "importance_sampling_level": "sequence", "delta": 1.7,
               "sapo_temperature_pos": 0.9, "sapo_temperature_neg": 1.2, "vespo_k_pos": 1.5,
               "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.5, "vespo_lambda_neg": 1.5,
               "use_bias_correction_kl": True, "beta": 0.1, "epsilon_low": 0.15, "epsilon_high": 0.3,
               "mask_truncated_completions": True, "top_entropy_quantile": 0.5}
    cfg = config_from_dict({
        "mode": "online", "model_path": TINY_MODEL, "attn_implementation": "sdpa", "seed": 0,
        "dataset_path": write_jsonl(tmp_path / "p.jsonl", [{"prompt": "c="}, {"prompt": "d="}]),
        "output_dir": str(tmp_path / "run"), "batch_size": 2, "lora": {"r": 4, "alpha": 8},
        "online": {"num_generations": 4, "max_prompt_length": 8, "max_completion_length": 3,
                   "rewards": [{"name": "rank"}], **options}})
    monkeypatch.setitem(rewards.BUILTIN_REWARDS, "rank",
                        lambda prompts, completions, **kw: [float(i % 4) for i in range(len(completions))])
    calls = []
    real = online.grpo_loss

    def spy(logps, old, ref, adv, mask, **kwargs):
        calls.append((mask.clone(), kwargs))
        return real(logps, old, ref, adv, mask, **kwargs)

    monkeypatch.setattr(online, "grpo_loss", spy)
    trainer = OnlineTrainer(cfg)
    roll = trainer.generate(["c=", "d="])
    roll.terminated[:3], roll.terminated[3:] = False, True   # three completions cut at the length limit
    monkeypatch.setattr(trainer, "generate", lambda prompts: roll)
    trainer.step([{"prompt": "c="}, {"prompt": "d="}])
    mask, kwargs = calls[0]
    for key, value in options.items():
        if key not in ("mask_truncated_completions", "top_entropy_quantile"):
            assert kwargs[key] == value, key
    assert not mask[:3].any() and torch.equal(mask[3:], roll.completion_mask[3:]), "truncated rows masked"
    kept = kwargs["entropy_mask"]
    assert kept is not None and 0 < int(kept.sum()) < int(mask.sum()), "only the high-entropy tokens"
