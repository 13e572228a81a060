"""Experiment trackers of the online trainer (`report_to`): TensorBoard, Weights & Biases,
Trackio. The offline trainer hands `report_to` to HF's Trainer, whose integrations log the same
three.

    tracker = open_tracker(cfg, output_dir)      # None with report_to: none
    tracker.log({"reward": 0.4, "eval/accuracy": 0.1}, step=20)
    tracker.close()

Each is optional: a missing package is a config error naming the extra to install, raised before
any model loads. Neither needs a network: W&B follows `WANDB_MODE` (set `WANDB_MODE=offline` to
write runs under `WANDB_DIR` for a later `wandb sync`), and Trackio writes to its local store
(`TRACKIO_DIR`, default `~/.cache/huggingface/trackio`) unless told to sync to a Space.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from .config import Config, ConfigError

# report_to -> (the module it needs, the pip extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio")}


def check_tracker(cfg: Config) -> None:
    """A config error if `report_to` names a tracker whose package is not installed."""
    if cfg.report_to == "none":
        return
    module, extra = PACKAGES[cfg.report_to]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"report_to: {cfg.report_to} needs the {module} package "
                          f"(pip install 'grpo-fast[{extra}]')")


class Tracker:
    """One run in one tracker: `log` a row of scalars at a step, `close` at the end."""

    def __init__(self, cfg: Config, output_dir: Path):
        self.kind = cfg.report_to
        name = Path(cfg.output_dir).name
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.run = SummaryWriter(cfg.logging_dir or str(output_dir / "runs"))
        elif self.kind == "wandb":
            import wandb

            self.run = wandb.init(project="grpo-fast", name=name, config=cfg.to_dict(),
                                  dir=cfg.logging_dir or str(output_dir))
        else:
            import trackio

            self.run = trackio.init(project="grpo-fast", name=name, config=cfg.to_dict())

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.kind == "tensorboard":
            # TensorBoard groups by the part before "/": plain names go under train/.
            for k, v in metrics.items():
                self.run.add_scalar(k if "/" in k else f"train/{k}", v, step)
        else:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.run.close()
        else:
            self.run.finish()


def open_tracker(cfg: Config, output_dir: Path) -> Optional[Tracker]:
    """The tracker `report_to` names, started; None for `none`."""
    check_tracker(cfg)
    return None if cfg.report_to == "none" else Tracker(cfg, output_dir)
