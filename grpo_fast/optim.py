"""The optimizer both trainers use: AdamW over the trainable parameters, or bitsandbytes' 8-bit
AdamW (`optim: adamw_8bit | paged_adamw_8bit`) for QLoRA on small cards.

    optimizer = build_optimizer(cfg, model)
"""

from __future__ import annotations

import torch

from .config import Config


def build_optimizer(cfg: Config, model, *, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norm weights (1-D) get no weight decay.

    `fused` (adamw_torch only, where every parameter is a CPU or CUDA float tensor): torch's fused
    kernel updates every tensor at once instead of a Python loop over them. The offline trainer
    passes False: the loop is HF Trainer's `adamw_torch`, so offline runs reproduce to the bit
    those made with HF's own optimizer (the fused kernel rounds differently)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optim == "adamw_torch":
        # torch's fused AdamW updates every tensor in one kernel (CPU and CUDA) instead of a
        # Python loop over them (benchmarks/README.md has the timing).
        fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused or None)
    import bitsandbytes.optim as bnb_optim

    cls = bnb_optim.AdamW8bit if cfg.optim == "adamw_8bit" else bnb_optim.PagedAdamW8bit
    return cls(groups, lr=cfg.learning_rate)
