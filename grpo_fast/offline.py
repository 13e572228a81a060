"""Offline GRPO training on scored completions, on top of the Hugging Face `Trainer`.

    grpo-fast train --config configs/tiny-offline.yaml [--set key=value ...] [--resume]

One step reads top to bottom: a batch of groups (B, K, T) -> per-completion sequence log-probs
from the fused kernel (B, K) -> listwise KL to the score distribution (+ beta x KL to the
reference, the same model with its adapter disabled) -> backward -> optimizer step. Subclassing
`Trainer` keeps logging, checkpoints (`save_steps`, `save_total_limit`), `--resume`,
`report_to` and accelerate as users expect; `metrics.jsonl` mirrors every logged row.
Checkpoints are written atomically (rundir.atomic_directory) and `--resume` takes the newest
complete one; resuming a finished run does nothing.

Data-parallel through HF's own distributed support (gloo on CPU, NCCL on GPUs):

    torchrun --nproc_per_node 2 --no-python grpo-fast train --config configs/tiny-offline.yaml
    accelerate launch --multi_gpu --num_processes 2 --no_python grpo-fast train --config ...

(accelerate's --multi_gpu is its torchrun launcher, CPU processes included; without it, and
without an accelerate config, it starts one process.) Under an FSDP2 accelerate config
(configs/accelerate/fsdp2.yaml) grpo-fast shards the model itself, on CPUs and GPUs alike, as the
online trainer does (grpo_fast.distributed.shard; accelerate would run DDP on a CPU): HF's Trainer
is handed a model sharded at load time, which it neither wraps nor shards again, and the
checkpoints hold the whole weights and optimizer states, gathered from the shards
(OfflineGRPOTrainer.save_model, _save_sharded_state). A DeepSpeed ZeRO config is HF's and
accelerate's to apply, on GPUs and, through DeepSpeed's CPU accelerator with gloo, on a CPU
(train_offline tells accelerate so); checkpoints are then DeepSpeed's own. Either way the loss
runs the kernel inside the sharded model's forward (grpo_fast.logprobs.as_forward, LMHead.apply),
where the LM head is whole, and the final model is gathered whole before it is written. A 4-bit
base under FSDP2 or ZeRO-3 is refused (grpo_fast.distributed.check).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import distributed, logprobs
from .config import Config, ConfigError
from .data import GroupCollator, load_offline_dataset
from .listwise import listwise_kl_loss, listwise_metrics
from .modeling import is_model_config_file, load_model_and_tokenizer
from .optim import build_optimizer
from .errors import TrainingStopped
from .preflight import check_finite, preflight
from .rundir import (CONFIG_FILE, METRICS_FILE, OFFLINE_CHECKPOINT_FILES, TMP_PREFIX, JsonlWriter,
                     load_torch_state, rotate_checkpoints, save_final, truncate_jsonl)

logger = logging.getLogger(__name__)


class MetricsFileCallback(TrainerCallback):
    """Appends every training log row (step, epoch and all metrics) to output_dir/metrics.jsonl
    as strict JSON. The end-of-run summary row (train_runtime, train_loss, ...) is not a point of
    the curve and is left out; `train` returns it."""

    def __init__(self, path: Path):
        self.log = JsonlWriter(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.is_world_process_zero or "train_runtime" in logs:
            return
        self.log.write({"step": state.global_step, "time": round(time.time(), 3), **logs})


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
        # Every trainable parameter (the adapters, or the whole model) reaches every step's loss,
        # so DDP need not search the graph for unused ones each backward (HF's default for a
        # PeftModel); a parameter that misses a gradient is then DDP's error, not a silent drift.
        ddp_find_unused_parameters=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class GRPOTrainerMixin:
    """Per-step metric accumulation, averaged into each log row (TRL's naming); under data
    parallelism over every process's micro-batches, as one process would over all of them."""

    def _init_metrics(self) -> None:
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def _record(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._metrics[k].append(float(v))

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if self.model.training and self._metrics:
            # Every process logs at the same steps with the same keys, so the reduce is matched.
            keys = sorted(self._metrics)
            finite = [[v for v in self._metrics[k] if v == v] for k in keys]
            sums = torch.tensor([[sum(f), len(f)] for f in finite], dtype=torch.float64,
                                device=self.args.device)                           # (keys, 2)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            for k, (total, n) in zip(keys, sums.tolist()):
                logs[k] = total / n if n else float("nan")
            self._metrics.clear()
        super().log(logs, start_time)


class OfflineGRPOTrainer(GRPOTrainerMixin, Trainer):
    """`Trainer` with the listwise offline GRPO loss (grpo_fast.listwise.listwise_kl_loss)."""

    def __init__(self, cfg: Config, world: distributed.World, **kwargs: Any):
        super().__init__(**kwargs)
        self.cfg, self.world = cfg, world
        self._init_metrics()

    def group_logprobs(self, model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return logprobs.group_logprobs(model, inputs, normalize=self.cfg.offline.length_normalize,
                                       backend=self.cfg.logprob_backend,
                                       shared_prompt=self.cfg.offline.shared_prompt)  # (B, K)

    def autocast_smart_context_manager(self, cache_enabled: Optional[bool] = True):
        """`mixed_precision`'s autocast around compute_loss. HF leaves autocast to accelerate,
        which installs it on the model's forward, and the log-prob path never calls that forward:
        it runs the decoder and the LM head itself (grpo_fast.logprobs)."""
        return self.accelerator.autocast()

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
            # No backward follows it, so it runs on the model inside a DDP wrapper or DeepSpeed
            # engine (which have no disable_adapter: looking for it on the wrapper would make the
            # reference the policy).
            inner = logprobs.unwrapped(model)
            ctx = inner.disable_adapter() if hasattr(inner, "disable_adapter") else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                ref_logps = self.group_logprobs(inner, inputs)
            # KL(p_ref || p) between the reference's and the policy's group distributions.
            ref_kl = listwise_kl_loss(seq_logps, ref_logps, group_mask,
                                      policy_temperature=off.policy_temperature,
                                      score_temperature=off.policy_temperature)
            loss = loss + off.beta * ref_kl
            metrics["ref_kl"] = ref_kl.item()
        # metrics holds .item()s, so the loss is on the host already: checking it costs nothing.
        check_finite(self.state.global_step + 1, loss=loss.detach())
        self._record(metrics)
        return (loss, {"seq_logps": seq_logps}) if return_outputs else loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Stop before a non-finite gradient reaches the weights (the optimizer steps right after
        this). Under fp16 an inf gradient is the loss scaler's business: it skips the update."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.cfg.mixed_precision != "fp16":
            check_finite(self.state.global_step + 1, grad_norm=grad_norm)
        return grad_norm

    def _save_checkpoint(self, model, trial) -> None:
        """HF writes checkpoint-<step>/ in place, so a kill mid-save leaves a half checkpoint
        that breaks every later --resume. Here it writes into a staging directory, renamed into
        place once complete (what the online trainer's rundir.atomic_directory does).

        Under data parallelism every process writes into it (its own rng_state_<rank>.pth; the
        main process the rest), so only the main process clears and renames it, with every
        process's writes finished before the rename and the rename before anyone goes on."""
        out = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        staging = out / f"{TMP_PREFIX}{name}"
        main = self.args.should_save
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
            if self.world.sharded:
                self._save_sharded_state(staging / name)
        finally:
            self.args.output_dir = str(out)
        self.accelerator.wait_for_everyone()
        if main:
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(staging / name, out / name)
            shutil.rmtree(staging)
            rotate_checkpoints(out, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    # -- FSDP2: grpo-fast shards the model (train_offline), HF's Trainer is told it came sharded. --
    # HF then writes only the model into a checkpoint (it cannot gather the optimizer's shards),
    # and that model a shard per rank; these methods write and read the whole of both instead
    # (save_model also gathers ZeRO-3's partitions, whose optimizer DeepSpeed checkpoints itself).

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """Gradients reduce-scattered in every micro-batch's backward, as the online trainer
        does under FSDP2: deferring would hold every gradient whole until the last one."""
        yield

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The whole model, gathered from FSDP2's shards or ZeRO-3's partitions by every rank
        (whatever the accelerate file says of zero3_save_16bit_model), written by the main one."""
        if not (self.world.sharded or distributed.is_zero3(self.model)):
            return super().save_model(output_dir, _internal_call)
        state_dict = distributed.full_state_dict(self.world, self.model)
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)

    def _save_sharded_state(self, ckpt: Path) -> None:
        """The whole optimizer state (gathered from the shards), the scheduler and every rank's
        RNG state into `ckpt`, beside the whole model `save_model` wrote: what HF's checkpoint
        holds unsharded, so that `--resume` continues exactly."""
        optimizer_state = distributed.optimizer_state_dict(self.world, self.model, self._torch_optimizer())
        self._save_rng_state(str(ckpt))
        if self.args.should_save:
            torch.save(optimizer_state, ckpt / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), ckpt / "scheduler.pt")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.world.sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Sharded, the weights were read from the checkpoint before the model was (train_offline).

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if not self.world.sharded or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        state = load_torch_state(Path(checkpoint) / "optimizer.pt", map_location="cpu")
        distributed.load_optimizer_state_dict(self.world, self.model, self._torch_optimizer(), state)
        self.lr_scheduler.load_state_dict(load_torch_state(Path(checkpoint) / "scheduler.pt"))

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer inside accelerate's wrapper, whose parameters torch's state-dict helpers map."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def total_steps(self) -> int:
        """The optimizer steps this config trains for, as HF's Trainer counts them."""
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]


@contextlib.contextmanager
def _built_whole(cfg: Config):
    """Random weights from a config file built whole, as one process builds them. Under a ZeRO-3
    config HF builds every model inside deepspeed.zero.Init, each rank holding only its
    partition from the start: right for pretrained weights, which no rank then holds whole, but
    random ones would differ from the seeded ones a single process builds, and base_model/
    would be saved empty. DeepSpeed partitions the whole model when it wraps it."""
    if not is_model_config_file(cfg.model_path):
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    held = hf_deepspeed._hf_deepspeed_config_weak_ref  # what is_deepspeed_zero3_enabled reads
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = held


def _mark_sharded(model: torch.nn.Module) -> None:
    """Tell HF's Trainer that `model` comes sharded, as transformers marks a model it sharded
    itself at load time (`from_pretrained(distributed_config=...)`): the Trainer then neither
    moves it, nor wraps it in DDP, nor has accelerate shard it again."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base._is_distributed_loading_by_transformers = True


def train_offline(cfg: Config, resume: bool = False, checked: Optional[tuple] = None) -> dict:
    """Train offline; `checked` is what grpo_fast.preflight.preflight returned, if the caller ran it."""
    # Every path and the output directory are checked before any model loads.
    resume_ckpt, _ = checked or preflight(cfg, resume, OFFLINE_CHECKPOINT_FILES)
    try:
        world = distributed.launched()
        distributed.check(cfg, world.size, world.strategy)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    overrides: dict[str, Any] = {}
    if world.sharded:
        # grpo-fast shards the model (below); accelerate, which would on a GPU, must not as well.
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        # HF can checkpoint only the model of such a run: OfflineGRPOTrainer writes the rest.
        overrides["save_only_model"] = True
    if world.zero and not torch.cuda.is_available():
        # accelerate builds a DeepSpeed engine only for a process not marked as a CPU one, and
        # counts the processes of the backend it is given: DeepSpeed's CPU accelerator's, gloo.
        overrides.update(use_cpu=False, ddp_backend="gloo")
    # First, so that under torchrun / accelerate launch the process group is up and the device
    # known: each process loads onto its own device, and only the main one writes or logs.
    args = training_arguments(cfg, **overrides)
    main = args.should_save
    if not args.should_log:
        # As HF quiets transformers on the other processes (log_level_replica).
        logging.getLogger(__package__).setLevel(logging.WARNING)
        datasets.disable_progress_bars()
    # Sharded, a resumed run reads the checkpoint's weights here, into the whole model, before
    # each rank keeps its shard (HF would read them into the shards, which it cannot).
    with _built_whole(cfg):
        model, tokenizer = load_model_and_tokenizer(
            cfg, device=args.device, output_dir=cfg.output_dir if main else None,
            adapter_path=str(resume_ckpt) if world.sharded and resume_ckpt is not None else None)
    if world.sharded:
        # Every rank loaded the same weights (seeded inits); each keeps its slice of them.
        distributed.shard(model)
        _mark_sharded(model)
        logger.info("FSDP2: every weight sharded over %d processes", world.size)
    train_ds = load_offline_dataset(cfg.dataset_path, tokenizer, cfg.max_seq_length, cfg.skip_invalid,
                                    score_temperature=cfg.offline.score_temperature)
    logger.info("train data: %d groups from %s", len(train_ds), cfg.dataset_path)
    trainer = OfflineGRPOTrainer(
        cfg,
        world,
        model=model,
        args=args,
        train_dataset=train_ds,
        data_collator=GroupCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(Path(cfg.output_dir) / METRICS_FILE)],
        # The optimizer both modes build; HF makes the scheduler from the arguments.
        optimizers=(build_optimizer(cfg, model, fused=False), None),
    )
    if world.sharded and not trainer.is_distributed_loading_by_transformers:
        # A transformers that no longer reads the mark would wrap the shards in DDP.
        raise RuntimeError("offline FSDP2 needs a transformers whose Trainer takes a model sharded at load time "
                           "(is_distributed_loading_by_transformers, 5.24): run it with ddp.yaml")
    if resume_ckpt is not None:
        step = json.loads((resume_ckpt / "trainer_state.json").read_text())["global_step"]
        total = trainer.total_steps()
        # A kill between the checkpoint and the next log row leaves rows the resumed run writes again.
        if main:
            truncate_jsonl(Path(cfg.output_dir) / METRICS_FILE, step)
        if step >= total:
            # HF would train one more step and overwrite the final model: a finished run stays as is.
            logger.info("the run in %s already finished at step %d of %d: nothing to do (raise "
                        "max_steps or num_epochs to train further)", cfg.output_dir, step, total)
            # The main process reads the checkpoint's weights (into ZeRO-3's partitions gathered
            # whole; FSDP2's shards hold them already), then every rank gathers them to be written.
            with distributed.written_by_main(trainer.model):
                if main:
                    trainer._load_from_checkpoint(str(resume_ckpt))
            state_dict = distributed.full_state_dict(world, trainer.model)
            if main and not (Path(cfg.output_dir) / CONFIG_FILE).is_file():
                save_final(cfg, trainer.model, tokenizer, cfg.output_dir, state_dict=state_dict)
            trainer.accelerator.wait_for_everyone()
            return {"global_step": step}
        logger.info("resuming from %s at step %d of %d", resume_ckpt, step, total)
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt else None)
    except TrainingStopped as e:
        raise TrainingStopped(f"{e}; checkpoints saved so far are in {cfg.output_dir}") from None
    # trainer.model is the model inside any DDP wrapper, identical on every process after the
    # last all-reduced step: one copy is written. Sharded (FSDP2, ZeRO-3), it is gathered whole
    # first, every process taking part.
    state_dict = distributed.full_state_dict(world, trainer.model)
    if main:
        save_final(cfg, trainer.model, tokenizer, cfg.output_dir, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()
    return result.metrics
