"""Online GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1): a lean custom training loop.

    grpo-fast train --config configs/tiny-online.yaml [--resume]
    grpo-fast eval  --config configs/tiny-online.yaml --adapter outputs/tiny-online

A *step* is one batch of rollouts (`gradient_accumulation_steps` micro-batches of `batch_size`
prompts x G = `online.num_generations` completions) and the `online.num_iterations` (mu)
optimizer updates made on it; with mu = 1, one step is one update, as in TRL. `OnlineTrainer.step`
reads top to bottom:

    rollout (no grad) -> rewards (B*G, F) -> group-relative advantages (B*G,)
    -> frozen log-probs: old (mu > 1 only), reference (beta > 0 only)
    -> mu x [per micro-batch: per-token log-probs (-> sampler correction weights, once, when an
       engine sampled) -> grpo_loss -> backward] -> clip -> AdamW step
    -> backend.after_update (a rollout backend with its own weights syncs before its next rollout)

Not the HF `Trainer`: generation, scoring and the update live in one loop here, with nothing to
override. Metrics (TRL's names) go to `output_dir/metrics.jsonl` every `logging_steps`, to
the `report_to` tracker (grpo_fast.trackers), and to a progress bar; sampled completions with their
rewards to `completions.jsonl` every `online.log_completions_steps`. Checkpoints
(`checkpoint-<step>/`: adapter or model, optimizer, scheduler, RNG states, position in the
prompt stream) every `save_steps`, the latest `save_total_limit` kept; `--resume` continues from
the latest complete one (grpo_fast.rundir). The seams: rollouts come from a backend
(grpo_fast.rollout, `online.generation_backend`), the loss type is a registered record
(grpo_fast.losses.get_loss_type), log-probs are grpo_fast.logprobs.completion_logps at the
rollout's temperature, greedy eval is grpo_fast.evaluate.greedy_eval. Tested by
tests/test_online.py and tests/test_wiring.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from . import distributed
from .config import Config, ConfigError
from .data import PromptStream, prompt_records, reward_inputs
from .errors import TrainingStopped
from .evaluate import greedy_eval
from .logprobs import completion_logps, reference_logps
from .losses import (get_loss_type, group_advantages, grpo_loss, high_entropy_mask, sampling_importance_weights,
                     truncated_completion_mask, zero_std_fraction)
from .modeling import default_device, load_base_model, load_model_and_tokenizer
from .preflight import check_finite, preflight
from .rewards import RewardLogs, compute_rewards, reward_columns, reward_metrics
from .rewards import TrainerState as RewardTrainerState
from .rollout import Rollout, completion_metrics, eos_token_ids, make_backend
from .trackers import open_tracker
from .rundir import (COMPLETIONS_FILE, CONFIG_FILE, METRICS_FILE, ONLINE_CHECKPOINT_FILES, ONLINE_STATE_FILE,
                     JsonlWriter, atomic_directory, capture_rng_state, load_rng_state, load_torch_state, read_jsonl,
                     rotate_checkpoints, save_final, save_rng_state, truncate_jsonl)

logger = logging.getLogger(__name__)

LOSS_OPTIONS = ("loss_type", "epsilon_low", "epsilon_high", "beta", "importance_sampling_level", "delta",
                "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
                "vespo_k_neg", "vespo_lambda_neg", "use_bias_correction_kl")
# Share of the logged rows averaged at each end of the run for the first-vs-last reward summary.
SUMMARY_WINDOW = 0.1


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each key's NaN-ignoring mean over the metric dicts that have it."""
    keys = dict.fromkeys(k for row in rows for k in row)
    return {k: _nanmean([row[k] for row in rows if k in row]) for k in keys}


@dataclass
class TrainState:
    """What a checkpoint needs besides weights, optimizer, scheduler and RNG states."""

    step: int = 0
    prompts_consumed: int = 0


class OnlineTrainer:
    """Policy, optional frozen reference, reward functions, optimizer and the step loop."""

    def __init__(self, cfg: Config, resume: bool = False, checked: Optional[tuple] = None):
        """`checked`: what grpo_fast.preflight.preflight returned, if the caller ran it."""
        self.cfg, self.o = cfg, cfg.online
        self.out = Path(cfg.output_dir)
        # Every path, the reward functions and the output directory are checked before any model
        # loads; nothing is written before that.
        resume_dir, self.reward_fns = checked or preflight(cfg, resume, ONLINE_CHECKPOINT_FILES)
        # Under torchrun / accelerate launch: one rank per process, each sampling its own share
        # of a step's prompts, the model replicated (DDP) or sharded (FSDP2, DeepSpeed ZeRO) as the
        # launcher's accelerate config says (grpo_fast.distributed); a world of one otherwise.
        try:
            self.world = distributed.setup()
            distributed.check(cfg, self.world.size, self.world.strategy)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # One seed for the weights on every rank (FSDP2 shards what each rank loaded, and a
        # random start or LoRA init must be the same everywhere), then each rank its own stream.
        set_seed(cfg.seed)
        self.device = default_device() if self.world.size == 1 or not torch.cuda.is_available() else \
            torch.device("cuda", self.world.local_rank)
        self.model, self.tokenizer = load_model_and_tokenizer(
            cfg, device=self.device, adapter_path=str(resume_dir) if resume_dir else None,
            output_dir=cfg.output_dir if self.world.main else None)
        self.model.train()
        self.ref_model = None
        if self.o.beta > 0 and not cfg.lora.enabled:
            # Full fine-tuning has no adapter to switch off: the reference is the starting
            # model, loaded once more (on resume too, where self.model holds trained weights).
            self.ref_model, _ = load_base_model(cfg, self.device)
            self.ref_model = distributed.prepare_frozen(self.world, cfg, self.ref_model.eval().requires_grad_(False))
        if self.world.size > 1:
            set_seed(cfg.seed + self.world.rank)
        # Every rank must run as many forwards as the others with sharded weights; sharing a
        # prompt's forward runs one decoder pass or two depending on the rank's completions.
        self.shared_prompt = self.o.shared_prompt and not self.world.lockstep
        self.backend = make_backend(cfg, self.model, self.tokenizer, eos_token_ids(self.model, self.tokenizer))
        self.loss_type = get_loss_type(self.o.loss_type)
        # The options of grpo_loss, named as the config (and TRL) name them.
        self.loss_options = {k: getattr(self.o, k) for k in LOSS_OPTIONS}
        # A backend that samples with its own numerics (vLLM) returns its log-probs; the loss
        # then corrects for the mismatch (TRL's vllm_importance_sampling_*).
        self.correct_sampling = self.o.vllm_importance_sampling_correction
        self.sampling_options = {"mode": self.o.vllm_importance_sampling_mode,
                                 "clip_min": self.o.vllm_importance_sampling_clip_min,
                                 "clip_max": self.o.vllm_importance_sampling_clip_max}

        self.prompts = prompt_records(cfg, self.tokenizer, cfg.dataset_path, hub=True)
        self.eval_prompts: list[dict] = []
        if self.o.eval_steps > 0 and cfg.eval_dataset_path:
            self.eval_prompts = prompt_records(cfg, self.tokenizer, cfg.eval_dataset_path)[:self.o.eval_max_samples]
        logger.info("online GRPO: %d prompts from %s, %d eval prompts, rewards %s", len(self.prompts),
                    cfg.dataset_path or self.o.dataset_name, len(self.eval_prompts),
                    ", ".join(f"{r.name} x {r.weight:g}" for r in self.reward_fns))

        prompts_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        total_steps = (cfg.max_steps if cfg.max_steps > 0
                       else math.ceil(cfg.num_epochs * len(self.prompts) / prompts_per_step))
        # From the config, also on resume: `--resume --set max_steps=...` extends a run.
        self.total_steps = total_steps
        self.state = TrainState()
        # Dynamic loss scaling keeps fp16 gradients from underflowing; disabled it passes through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")
        # What the training passes run (the model, its DDP wrapper, the model sharded by FSDP2, or
        # a ZeRO engine), the optimizer, and how micro-batch losses become an update.
        self.train_model, self.optimizer, self.update = distributed.prepare(self.world, cfg, self.model, self.scaler)
        updates = total_steps * self.o.num_iterations
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup_ratio * updates),
                                       num_training_steps=updates)
        if resume_dir:
            self.load_checkpoint(resume_dir)
        # One stream, the same on every rank: each takes the whole step's prompts, keeps its share.
        self.stream = PromptStream(len(self.prompts), cfg.seed, self.state.prompts_consumed)
        self.metrics_log = JsonlWriter(self.out / METRICS_FILE)
        self.completions_log = JsonlWriter(self.out / COMPLETIONS_FILE)
        self.tracker = open_tracker(cfg, self.out) if self.world.main else None

    # ---------------------------------------------------------------------------------------
    # One step
    # ---------------------------------------------------------------------------------------

    def generate(self, prompts: list[str]) -> Rollout:
        return self.backend.generate(prompts)

    def autocast(self):
        """bf16/fp16 autocast of the log-prob forwards (mixed_precision); a no-op with "no"."""
        mp = self.cfg.mixed_precision
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if mp == "bf16" else torch.float16,
                              enabled=mp != "no")

    def completion_logps(self, model, roll: Rollout) -> tuple[Tensor, Tensor]:
        with self.autocast():
            return completion_logps(model, roll, backend=self.cfg.logprob_backend, shared_prompt=self.shared_prompt)

    def reference_logps(self, roll: Rollout) -> Tensor:
        with self.autocast():
            return reference_logps(self.model, self.ref_model, roll, backend=self.cfg.logprob_backend,
                                   shared_prompt=self.shared_prompt)

    def step(self, records: list[dict]) -> tuple[dict[str, float], dict]:
        """One GRPO step on `records` (batch_size x gradient_accumulation_steps prompt records).
        Returns (metrics, samples) where samples holds what `log_completions` writes."""
        cfg, o = self.cfg, self.o
        G, ga, mu = o.num_generations, cfg.gradient_accumulation_steps, o.num_iterations

        # 1. Rollout: ga micro-batches of B prompts x G completions from the current policy.
        t_rollout = time.perf_counter()
        chunks = [records[i:i + cfg.batch_size] for i in range(0, len(records), cfg.batch_size)]
        rolls = [self.generate([r["prompt"] for r in chunk]) for chunk in chunks]      # ga x (B*G, C_k)

        # 2. Rewards of all ga*B*G completions, called as TRL calls them (keywords; chat prompts
        #    give chat prompts and completions); dataset columns repeated G times to align.
        prompts = [r["prompt"] for r in records for _ in range(G)]
        texts = [t for roll in rolls for t in roll.texts]
        columns = reward_columns(records, [ids for r in rolls for ids in r.completion_token_lists()],
                                 [t for r in rolls for t in r.terminated.tolist()], G)
        reward_logs = RewardLogs()
        state = RewardTrainerState(global_step=self.state.step, max_steps=self.total_steps, epoch=self.stream.epoch)
        try:
            per_fn, rewards = compute_rewards(self.reward_fns, *reward_inputs(records, texts, G), columns,
                                              trainer_state=state, logs=reward_logs)  # (ga*B*G, F), (ga*B*G,)
        except ValueError as e:  # a reward function returned something unusable (NaN, wrong count)
            raise TrainingStopped(f"step {self.state.step + 1}: {e}") from None

        # 3. Group-relative advantages over the whole step, every rank's rewards in rank order
        #    (a group never straddles ranks), so scale="batch" sees every micro-batch's rewards.
        n, rank = rewards.numel(), self.world.rank
        everyone = distributed.gather_tensor(self.world, rewards)                       # (world*ga*B*G,)
        advantages = group_advantages(everyone, G, scale=o.scale_rewards)[rank * n:(rank + 1) * n]  # (ga*B*G,)
        advantages = advantages.to(self.device).split(cfg.batch_size * G)               # ga x (B*G,)
        time_rollout = time.perf_counter() - t_rollout

        # 4. The rows to train on. A loss type with a global normalizer (dapo) weighs every
        #    completion token of the step equally, across micro-batches. With beta = 0 it also
        #    makes a completion of zero advantage (its group's rewards all equal) add exactly 0 to
        #    the loss and the gradient, its tokens being counted in num_items already: the passes
        #    below skip it (often a third of the rows or more).
        t_train = time.perf_counter()
        # The step's completion tokens on every rank: a global normalizer counts them all.
        num_items = int(distributed.sum_across(self.world, sum(self.loss_mask(r).sum() for r in rolls)))
        batches = list(zip(rolls, advantages))
        # (Not under top_entropy_quantile < 1: its quantile is over the whole micro-batch's tokens.)
        if o.beta == 0 and self.loss_type.global_normalizer and o.top_entropy_quantile == 1.0:
            batches = [informative_rows(roll, adv) for roll, adv in batches]

        # 5. Frozen log-probs. With mu = 1 the sampling policy *is* the current one, so grpo_loss
        #    uses logp.detach() and this pass is skipped; with beta = 0 there is no reference pass.
        with torch.no_grad():
            old = [self.completion_logps(self.model, r)[0] for r, _ in batches] if mu > 1 else [None] * ga
        ref = [self.reference_logps(r) for r, _ in batches] if o.beta > 0 else [None] * ga

        # 6. mu optimisation passes over the same samples, one optimizer update each. Sums stay
        #    on the device (one host sync at the end, not one per micro-batch).
        loss_sum = torch.zeros((), device=self.device)
        entropy_sum = torch.zeros((), device=self.device)
        grad_norms, loss_metrics, sampling_metrics = [], [], []
        masks = [self.loss_mask(roll) for roll, _ in batches]                         # ga x (k, C)
        sampling_weights: list[Optional[Tensor]] = [None] * ga
        for _ in range(mu):
            for k, ((roll, adv), mask, old_lp, ref_lp) in enumerate(zip(batches, masks, old, ref)):
                # DDP all-reduces in the backward of the pass's last micro-batch only.
                last = k == len(batches) - 1
                with self.train_model.no_sync() if self.world.defers_sync and not last else contextlib.nullcontext():
                    logps, entropy = self.completion_logps(self.train_model, roll)      # (k, C) x2
                    if self.correct_sampling and roll.sampler_logps is not None and sampling_weights[k] is None:
                        # An engine sampled the rows: weigh each by how much likelier the trainer's
                        # policy at sampling time (old, or this very forward when mu = 1) finds it.
                        sampling_weights[k], metrics = sampling_importance_weights(
                            logps.detach() if old_lp is None else old_lp, roll.sampler_logps, mask,
                            **self.sampling_options)                                     # (k, C) or (k, 1)
                        sampling_metrics.append(metrics)
                    # top_entropy_quantile < 1: only the highest-entropy tokens carry the policy loss.
                    entropy_mask = (high_entropy_mask(entropy.detach(), mask, o.top_entropy_quantile)
                                    if o.top_entropy_quantile < 1.0 else None)
                    loss, metrics = grpo_loss(
                        logps, old_lp, ref_lp, adv, mask, max_completion_length=o.max_completion_length,
                        num_items_in_batch=num_items, entropy_mask=entropy_mask,
                        sampling_weights=sampling_weights[k], **self.loss_options)
                    # A loss normalized within a micro-batch (grpo, bnpo, dr_grpo) is divided by ga:
                    # the step's gradient is their mean over micro-batches (for grpo and dr_grpo
                    # exactly the full-batch value, micro-batches being equal-sized). A global
                    # normalizer (dapo) already divides by the whole step's token count, so its
                    # micro-batch losses simply add up.
                    if not self.loss_type.global_normalizer:
                        loss = loss / ga
                    else:
                        # DDP, FSDP2 and ZeRO average the ranks' gradients; a global normalizer
                        # wants their sum.
                        loss = loss * self.world.size
                    self.update.backward(loss)
                    loss_sum += loss.detach()
                    entropy_sum += (entropy * roll.completion_mask).sum()
                    loss_metrics.append(metrics)
            # Clip and update, stopping before a non-finite update reaches the weights (and so any
            # checkpoint). Under fp16 an inf gradient is the loss scaler's business: it skips that update.
            grad_norm = self.update.step(lambda norm: check_finite(
                self.state.step + 1, loss=loss_sum, grad_norm=None if cfg.mixed_precision == "fp16" else norm))
            grad_norms.append(grad_norm.to(self.device))
            learning_rate = self.scheduler.get_last_lr()[0]
            self.scheduler.step()
            self.backend.after_update(self.model)  # an engine syncs before its next rollout
        # Entropy (and the clip ratios) describe the completions trained on.
        trained_items = sum(roll.lengths.sum() for roll, _ in batches)
        loss_value, entropy_value, grad_norm = torch.stack(
            [loss_sum / mu, entropy_sum / (mu * trained_items), torch.stack(grad_norms).mean()]).tolist()
        time_train = time.perf_counter() - t_train

        lengths = torch.cat([r.lengths for r in rolls]).cpu()                           # (ga*B*G,)
        terminated = torch.cat([r.terminated for r in rolls]).cpu()                     # (ga*B*G,)
        out = {"loss": loss_value,
               **reward_metrics(per_fn, rewards, self.reward_fns),
               **completion_metrics(lengths, terminated),
               **_mean_rows(loss_metrics), **_mean_rows(sampling_metrics),
               "entropy": entropy_value,
               "frac_reward_zero_std": zero_std_fraction(rewards, G),
               "learning_rate": learning_rate,
               "grad_norm": grad_norm,
               "time/rollout": time_rollout,
               "time/train": time_train,
               **self.backend.metrics(),
               **reward_logs.metric_means()}
        samples = {"prompts": prompts, "texts": texts, "rewards": rewards.tolist(),
                   "per_fn": per_fn.tolist(), "advantages": torch.cat(advantages).tolist(),
                   "extra": reward_logs.extra}
        if self.world.size > 1:
            out, samples = self.across_ranks(out, samples, lengths, terminated)
        return out, samples

    def across_ranks(self, out: dict, samples: dict, lengths: Tensor, terminated: Tensor) -> tuple[dict, dict]:
        """The step's metrics and samples over every rank: reward and length statistics from all
        completions, the other metrics averaged (each rank's loss is already its share of the
        step's), the samples concatenated in rank order."""
        rows = distributed.gather_objects(self.world, (out, samples, lengths.tolist(), terminated.tolist()))
        merged = {k: [v for _, s, _, _ in rows for v in s[k]] for k in ("prompts", "texts", "rewards", "per_fn",
                                                                          "advantages")}
        columns = dict.fromkeys(c for _, s, _, _ in rows for c in s["extra"])
        merged["extra"] = {c: [v for _, s, _, _ in rows for v in s["extra"].get(c, [None] * len(s["texts"]))]
                           for c in columns}
        per_fn, rewards = torch.tensor(merged["per_fn"]), torch.tensor(merged["rewards"])
        metrics = {**_mean_rows([o for o, _, _, _ in rows]),
                   **reward_metrics(per_fn, rewards, self.reward_fns),
                   **completion_metrics(torch.tensor([n for _, _, ls, _ in rows for n in ls]),
                                        torch.tensor([t for _, _, _, ts in rows for t in ts])),
                   "frac_reward_zero_std": zero_std_fraction(rewards, self.o.num_generations)}
        return metrics, merged

    def loss_mask(self, roll: Rollout) -> Tensor:
        """(N, C) the completion tokens the loss counts: all of them, or with
        mask_truncated_completions none of a completion cut at the length limit."""
        if self.o.mask_truncated_completions:
            return truncated_completion_mask(roll.completion_mask, roll.terminated)
        return roll.completion_mask

    # ---------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg, state = self.cfg, self.state
        prompts_per_step = cfg.batch_size * cfg.gradient_accumulation_steps
        pending: list[dict[str, float]] = []
        start = time.perf_counter()
        if state.step >= self.total_steps and (self.out / CONFIG_FILE).is_file():
            logger.info("the run in %s already finished at step %d of %d: nothing to do (raise "
                        "max_steps or num_epochs to train further)", self.out, state.step, self.total_steps)
            return {"global_step": state.step, "train_runtime": 0.0, **reward_summary(self.out / METRICS_FILE)}
        bar = tqdm(total=self.total_steps, initial=state.step, desc="online GRPO", dynamic_ncols=True,
                   disable=not self.world.main)
        try:
            while state.step < self.total_steps:
                share = self.stream.take(prompts_per_step * self.world.size)
                rank = self.world.rank
                records = [self.prompts[i] for i in share[rank * prompts_per_step:(rank + 1) * prompts_per_step]]
                metrics, samples = self.step(records)
                state.step += 1
                state.prompts_consumed = self.stream.position
                pending.append(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", loss=f"{metrics['loss']:.4f}")
                if state.step == 1 or state.step % cfg.logging_steps == 0 or state.step == self.total_steps:
                    # A key only some steps log (a reward function's log_metric) averages over those.
                    keys = dict.fromkeys(k for m in pending for k in m)
                    self.log_row({k: _nanmean([m.get(k, math.nan) for m in pending]) for k in keys})
                    pending.clear()
                if self.o.log_completions_steps > 0 and state.step % self.o.log_completions_steps == 0:
                    self.log_completions(samples)
                if self.eval_prompts and state.step % self.o.eval_steps == 0:
                    self.log_row({f"eval/{k}": v for k, v in self.evaluate(self.eval_prompts).items()})
                if state.step % cfg.save_steps == 0:
                    self.save_checkpoint()
        except TrainingStopped as e:
            raise TrainingStopped(f"{e}; checkpoints saved so far are in {self.out}") from None
        except Exception:
            logger.error("training stopped at step %d; checkpoints saved so far are in %s",
                         state.step + 1, self.out)
            raise
        finally:
            bar.close()
            self.backend.close()
            if self.tracker is not None:
                self.tracker.close()
        state_dict = distributed.full_state_dict(self.world, self.model)
        if self.world.main:
            save_final(cfg, self.model, self.tokenizer, cfg.output_dir, state_dict=state_dict)
        distributed.barrier(self.world)
        summary = {"global_step": state.step, "train_runtime": time.perf_counter() - start,
                   **reward_summary(self.out / METRICS_FILE)}
        if "reward_first" in summary:
            logger.info("mean reward over the first %d%% of logged steps %.4f -> last %d%% %.4f (%d rows)",
                        round(100 * SUMMARY_WINDOW), summary["reward_first"], round(100 * SUMMARY_WINDOW),
                        summary["reward_last"], summary["reward_rows"])
        return summary

    def log_row(self, logs: dict[str, float]) -> None:
        """One metrics row: metrics.jsonl (as the offline MetricsFileCallback writes it), the
        report_to tracker, and the log."""
        if not self.world.main:
            return
        logs = {**logs, "epoch": round(self.stream.epoch, 4)}
        self.metrics_log.write({"step": self.state.step, "time": round(time.time(), 3), **logs})
        if self.tracker is not None:
            self.tracker.log(logs, self.state.step)
        shown = ("reward", "loss", "kl", "entropy", "completions/mean_length", "eval/accuracy", "eval/reward")
        logger.info("step %d: %s", self.state.step,
                    ", ".join(f"{k}={logs[k]:.4g}" for k in shown if k in logs))

    def log_completions(self, samples: dict) -> None:
        """Every completion of this step with its rewards to completions.jsonl; a few to the log."""
        if not self.world.main:
            return
        names = [r.name for r in self.reward_fns]
        self.completions_log.write_many([
            {"step": self.state.step, "prompt": prompt, "completion": text,
             "reward": samples["rewards"][i], "advantage": samples["advantages"][i],
             "rewards": dict(zip(names, samples["per_fn"][i])),
             **{column: values[i] for column, values in samples["extra"].items()}}
            for i, (prompt, text) in enumerate(zip(samples["prompts"], samples["texts"]))])
        for i in range(min(self.o.num_generations, len(samples["texts"]))):
            logger.info("sample (step %d) reward %.3f adv %+.3f | %r -> %r", self.state.step,
                        samples["rewards"][i], samples["advantages"][i],
                        samples["prompts"][i][-60:], samples["texts"][i][:120])

    def evaluate(self, records: list[dict]) -> dict[str, float]:
        """greedy_eval of `records`, each rank scoring its share: the metrics are means over
        records, so the ranks' means weighted by their counts are the whole set's."""
        if self.world.size == 1:
            return greedy_eval(self.backend, self.reward_fns, records)
        mine = records[self.world.rank::self.world.size]
        # A rank without a record still decodes one with sharded weights (forwards are collectives).
        scored = greedy_eval(self.backend, self.reward_fns, mine or records[:1]) if mine or self.world.lockstep else {}
        rows = distributed.gather_objects(self.world, (scored if mine else {}, len(mine)))
        total = sum(count for _, count in rows)
        return {k: sum(m[k] * count for m, count in rows if count) / total for k in next(m for m, c in rows if c)}

    # ---------------------------------------------------------------------------------------
    # Checkpoints
    # ---------------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step>/ atomically (rundir.atomic_directory: a kill mid-save never
        leaves a half checkpoint for --resume), then rotate."""
        final = self.out / f"checkpoint-{self.state.step}"
        # Every rank's RNG state (its own sampling stream); the weights and optimizer states are
        # the same on every rank (gathered whole from the shards under FSDP2), so the main
        # process writes the checkpoint alone.
        rng_states = distributed.gather_objects(self.world, capture_rng_state())
        state_dict = distributed.full_state_dict(self.world, self.model)
        optimizer_state = distributed.optimizer_state_dict(self.world, self.train_model, self.optimizer)
        if self.world.main:
            with atomic_directory(final) as tmp:
                self.model.save_pretrained(tmp, state_dict=state_dict)
                self.tokenizer.save_pretrained(tmp)
                torch.save(optimizer_state, tmp / "optimizer.pt")
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(self.scaler.state_dict(), tmp / "scaler.pt")
                save_rng_state(tmp, rng_states)
                (tmp / ONLINE_STATE_FILE).write_text(json.dumps(asdict(self.state), indent=2))
            rotate_checkpoints(self.out, self.cfg.save_total_limit)
            logger.info("saved %s", final)
        distributed.barrier(self.world)
        return final

    def load_checkpoint(self, ckpt: Path) -> None:
        """Restore what the weights (already loaded from `ckpt`) do not hold, and drop log rows
        past the checkpoint that a crashed run wrote, so the resumed curve has no duplicates."""
        self.state = TrainState(**json.loads((ckpt / ONLINE_STATE_FILE).read_text()))
        distributed.load_optimizer_state_dict(self.world, self.train_model, self.optimizer,
                                              load_torch_state(ckpt / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(load_torch_state(ckpt / "scheduler.pt"))
        if (ckpt / "scaler.pt").is_file():
            self.scaler.load_state_dict(load_torch_state(ckpt / "scaler.pt"))
        load_rng_state(ckpt, self.world.rank)
        if self.world.main:
            for name in (METRICS_FILE, COMPLETIONS_FILE):
                truncate_jsonl(self.out / name, self.state.step)
        logger.info("resumed from %s at step %d of %d", ckpt, self.state.step, self.total_steps)


def informative_rows(roll: Rollout, advantages: Tensor) -> tuple[Rollout, Tensor]:
    """The rows of a micro-batch with a non-zero advantage, and their advantages. A micro-batch
    without any keeps its first row (zero gradient), so that every parameter still gets a
    gradient and AdamW's update is the one the full batch gives."""
    keep = advantages != 0                                                            # (N,)
    keep[0] |= ~keep.any()
    rows = keep.nonzero().squeeze(1)                                                  # (k,)
    return roll.select(rows), advantages[rows]


def reward_summary(metrics_path: Path) -> dict[str, float]:
    """Mean `reward` of the first and last SUMMARY_WINDOW of the logged rows (at least one each)."""
    if not metrics_path.is_file():
        return {}
    rewards = [row["reward"] for row in read_jsonl(metrics_path)
               if isinstance(row.get("reward"), (int, float)) and math.isfinite(row["reward"])]
    if not rewards:
        return {}
    n = max(1, round(len(rewards) * SUMMARY_WINDOW))
    return {"reward_first": sum(rewards[:n]) / n, "reward_last": sum(rewards[-n:]) / n,
            "reward_rows": len(rewards)}


def train_online(cfg: Config, resume: bool = False, checked: Optional[tuple] = None) -> dict:
    """Train with online GRPO; returns a summary (steps, runtime, first vs last mean reward)."""
    return OnlineTrainer(cfg, resume, checked).train()
