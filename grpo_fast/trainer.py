"""Offline GRPO training on scored completions, on top of the Hugging Face `Trainer`.

    grpo-fast train --config configs/tiny-offline.yaml [--set key=value ...] [--resume]

One step reads top to bottom: a batch of groups (B, K, T) -> per-completion sequence log-probs
from the fused kernel (B, K) -> listwise KL to the score distribution (+ beta x KL to the
reference, the same model with its adapter disabled) -> backward -> optimizer step. Subclassing
`Trainer` keeps logging, checkpoints (`save_steps`, `save_total_limit`), `--resume`,
`report_to` and accelerate as users expect; `metrics.jsonl` mirrors every logged row.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from . import logprobs
from .config import Config, ConfigError
from .data import GroupCollator, load_offline_dataset
from .losses import listwise_kl_loss, listwise_metrics
from .modeling import load_model_and_tokenizer

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "grpo_config.yaml"


class MetricsFileCallback(TrainerCallback):
    """Appends every log row (step, epoch and all metrics) to output_dir/metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.is_world_process_zero:
            return
        row = {"step": state.global_step, "time": round(time.time(), 3), **logs}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def check_output_dir(output_dir: str, resume: bool) -> None:
    """Refuse to train into a directory that holds another run's checkpoints unless resuming:
    `save_total_limit` rotation would otherwise delete them."""
    if resume:
        if not Path(output_dir).is_dir() or get_last_checkpoint(output_dir) is None:
            raise ConfigError(f"--resume: no checkpoint-* directory in output_dir {output_dir}")
        return
    if Path(output_dir).is_dir() and get_last_checkpoint(output_dir) is not None:
        raise ConfigError(f"output_dir {output_dir} already holds checkpoints of another run; "
                          "pass --resume to continue it, or choose another output_dir")


def training_arguments(cfg: Config, **overrides: Any) -> TrainingArguments:
    if cfg.logging_dir:
        # transformers 5 reads the TensorBoard directory from the environment.
        os.environ["TENSORBOARD_LOGGING_DIR"] = cfg.logging_dir
    on_cuda = torch.cuda.is_available()
    kwargs = dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        bf16=cfg.mixed_precision == "bf16",
        fp16=cfg.mixed_precision == "fp16",
        use_cpu=not on_cuda,
        remove_unused_columns=False,
        dataloader_pin_memory=on_cuda,
        # The collator builds padded tensors; worker processes would only add start-up time.
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class GRPOTrainerMixin:
    """Per-step metric accumulation, averaged into each log row (TRL's naming)."""

    def _init_metrics(self) -> None:
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def _record(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._metrics[k].append(float(v))

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if self.model.training and self._metrics:
            for k, values in self._metrics.items():
                finite = [v for v in values if v == v]
                logs[k] = sum(finite) / len(finite) if finite else float("nan")
            self._metrics.clear()
        super().log(logs, start_time)


class OfflineGRPOTrainer(GRPOTrainerMixin, Trainer):
    """`Trainer` with the listwise offline GRPO loss (grpo_fast.losses.listwise_kl_loss)."""

    def __init__(self, cfg: Config, **kwargs: Any):
        super().__init__(**kwargs)
        self.cfg = cfg
        self._init_metrics()

    def group_logprobs(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return logprobs.group_logprobs(model, inputs, normalize=self.cfg.offline.length_normalize,
                                       backend=self.cfg.logprob_backend,
                                       shared_prompt=self.cfg.offline.shared_prompt)  # (B, K)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        off = self.cfg.offline
        scores, group_mask = inputs["scores"], inputs["group_mask"]       # (B, K)
        seq_logps = self.group_logprobs(model, inputs)                     # (B, K)
        loss = listwise_kl_loss(seq_logps, scores, group_mask,
                                policy_temperature=off.policy_temperature,
                                score_temperature=off.score_temperature,
                                direction=off.kl_direction)
        metrics = listwise_metrics(seq_logps.detach(), scores, group_mask,
                                   policy_temperature=off.policy_temperature,
                                   score_temperature=off.score_temperature)
        if off.beta > 0:
            # Reference = the same weights with the LoRA adapter off: no second copy in memory.
            ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
            with torch.no_grad(), ctx:
                ref_logps = self.group_logprobs(model, inputs)
            # KL(p_ref || p) between the reference's and the policy's group distributions.
            ref_kl = listwise_kl_loss(seq_logps, ref_logps, group_mask,
                                      policy_temperature=off.policy_temperature,
                                      score_temperature=off.policy_temperature)
            loss = loss + off.beta * ref_kl
            metrics["ref_kl"] = ref_kl.item()
        self._record(metrics)
        return (loss, {"seq_logps": seq_logps}) if return_outputs else loss


def save_final(cfg: Config, model, tokenizer, output_dir: str) -> None:
    """Adapter (or full model) as safetensors, tokenizer and the resolved config."""
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (Path(output_dir) / CONFIG_FILE).write_text(cfg.to_yaml())
    logger.info("saved %s, tokenizer and %s to %s",
                "LoRA adapter" if cfg.lora.enabled else "model", CONFIG_FILE, output_dir)


def train_offline(cfg: Config, resume: bool = False) -> dict:
    check_output_dir(cfg.output_dir, resume)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_and_tokenizer(cfg, output_dir=cfg.output_dir)
    train_ds = load_offline_dataset(cfg.dataset_path, tokenizer, cfg.max_seq_length, cfg.skip_invalid)
    logger.info("train data: %d groups from %s", len(train_ds), cfg.dataset_path)
    trainer = OfflineGRPOTrainer(
        cfg,
        model=model,
        args=training_arguments(cfg),
        train_dataset=train_ds,
        data_collator=GroupCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(Path(cfg.output_dir) / METRICS_FILE)],
    )
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    save_final(cfg, trainer.model, tokenizer, cfg.output_dir)
    return result.metrics


def train(cfg: Config, resume: bool = False) -> dict:
    """Train in cfg.mode; returns the final metrics."""
    if cfg.mode == "offline":
        return train_offline(cfg, resume)
    from .online import train_online

    return train_online(cfg, resume)
