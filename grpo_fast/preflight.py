"""Checks run before a model loads, and the error that stops a run that went wrong.

    resume_ckpt, reward_fns = preflight(cfg, resume, ONLINE_CHECKPOINT_FILES)

`preflight` checks, in this order and in seconds, everything a user can get wrong in a config:
the data files, the output directory (writable, no earlier run in it unless resuming), the
adapter path, the reward functions (importing a reward module runs its code) and the model
source. Each problem is a `ConfigError` naming the key, so `grpo-fast train` prints one line and
exits with status 2 before anything is written. `check_finite` is the guard the trainers call on
every update: a non-finite loss or gradient norm raises `TrainingStopped` naming the step, before
the update reaches the weights or a checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import Config, ConfigError
from .errors import TrainingStopped
from .modeling import check_adapter_source, check_model_source, default_device
from .reward_models import load_reward_functions
from .rewards import RewardFunction
from .rollout import backend_class
from .rundir import prepare_output_dir
from .trackers import check_tracker

logger = logging.getLogger(__name__)


def check_input_file(path: Optional[str], key: str) -> None:
    """`path` (when set) is a readable file."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{key}: {path} does not exist")
    if not p.is_file():
        raise ConfigError(f"{key}: {path} is not a file")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"{key}: {path} is not readable")


def check_sources(cfg: Config, adapter: Optional[str] = None) -> None:
    """The adapter (`adapter`, from --adapter, else lora_path) and the model source of `cfg`."""
    if adapter is not None:
        check_adapter_source(adapter, "--adapter", lora=cfg.lora.enabled)
    elif cfg.lora_path is not None:
        check_adapter_source(cfg.lora_path, "lora_path", lora=True)
    check_model_source(cfg.model_path, "model_path")


def load_rewards(cfg: Config) -> list[RewardFunction]:
    """The online reward functions (reward models loaded onto the policy's device); an import or
    spec problem is a config error. Reward modules are looked for in the config file's directory,
    then the working directory, then sys.path."""
    search_paths = [p for p in (getattr(cfg, "config_dir", None), os.getcwd()) if p]
    try:
        return load_reward_functions([asdict(s) for s in cfg.online.rewards], search_paths=search_paths,
                                     device=default_device())
    except ValueError as e:
        raise ConfigError(str(e)) from None


def preflight(cfg: Config, resume: bool,
              checkpoint_files: Sequence[str | tuple[str, ...]]) -> tuple[Optional[Path], list[RewardFunction]]:
    """Check a training config before any model loads. Returns (the checkpoint to resume from
    or None, the loaded reward functions: empty offline)."""
    for key in ("dataset_path", "eval_dataset_path"):
        check_input_file(getattr(cfg, key), key)
    check_tracker(cfg)
    resume_ckpt = prepare_output_dir(cfg.output_dir, resume, checkpoint_files)
    reward_fns = []
    if cfg.mode == "online":
        reward_fns = load_rewards(cfg)
        try:
            backend_class(cfg.online.generation_backend).check_config(cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    check_sources(cfg)
    # Logged once the config has passed, so that a bad one ends in its one-line error alone.
    logger.info("resolved config (%s mode; keys the other mode reads left out):\n%s",
                cfg.mode, cfg.to_yaml(for_mode=True))
    return resume_ckpt, reward_fns


def check_finite(step: int, **values: Optional[torch.Tensor | float]) -> None:
    """Raise TrainingStopped if any of `values` (scalars; None skips one) is not finite. One
    host sync for all of them."""
    named = [(k, v) for k, v in values.items() if v is not None]
    if not named:
        return
    device = next((v.device for _, v in named if isinstance(v, torch.Tensor)), None)
    numbers = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().reshape(())
                           for _, v in named]).cpu()
    if bool(torch.isfinite(numbers).all()):
        return
    bad = ", ".join(f"{k} is {v:g}" for (k, _), v in zip(named, numbers.tolist()) if not math.isfinite(v))
    raise TrainingStopped(f"step {step}: {bad}; stopped before the update reached the weights "
                          "(check the data's scores or rewards, lower learning_rate, or set max_grad_norm)")
