"""Data parallelism for the online trainer: the process group that `torchrun` or `accelerate
launch` set up the environment for, how the model is spread over it (DDP, FSDP2 or ZeRO), and
the few collectives the step needs. The offline trainer (HF's Trainer) uses `strategy`, `check`,
`shard` and the whole-state-dict helpers.

    torchrun --nproc_per_node 2 --no-python grpo-fast train --config configs/tiny-online.yaml
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --no_python grpo-fast train ...

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` joins
the group they describe (NCCL on CUDA, gloo on CPU) and pins each process to its GPU. Without
them (a plain `grpo-fast train`) it is a world of one and every collective here is the
identity, so the single-process path runs exactly as before. The online trainer keeps a
prompt's G completions on one rank and gathers what the step needs across ranks (rewards for
the advantages, token counts for the global normalizer, metrics and completions for the logs).

The strategy is the launcher's: `accelerate launch` with an FSDP or DeepSpeed config exports
ACCELERATE_USE_FSDP / FSDP_VERSION / FSDP_* or ACCELERATE_USE_DEEPSPEED /
ACCELERATE_DEEPSPEED_* (read here, so the same file means the same on a CPU, where accelerate
itself would fall back to DDP); anything else is DDP. `prepare` applies it to the policy and its
optimizer: DDP (the model replicated), FSDP2 (`shard`: torch's `fully_shard`, one unit per decoder
layer plus the root, parameters, gradients and optimizer states sharded) or a DeepSpeed ZeRO-2/3
engine around model and optimizer (`zero_engine`; gloo on a CPU, through DeepSpeed's CPU
accelerator), with the `TorchUpdate` / `ZeroUpdate` that turns a step's micro-batch losses into
one optimizer update; `prepare_frozen` spreads a reference model the same way. With sharded weights (FSDP2,
ZeRO-3) every forward is a collective, so every rank must run the same number of them:
`all_true` lets a rank that has finished decoding keep step with the others, `gathered` holds
the whole policy for a rollout instead (grpo_fast.rollout.hf).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from .config import ConfigError
from .optim import build_optimizer


STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # One of STRATEGIES: what the launcher's accelerate config asks for (`strategy`).
    strategy: str = "ddp"

    @property
    def main(self) -> bool:
        """The process that writes the run directory (logs, checkpoints, the final model)."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Parameters sharded by FSDP2 (`shard`)."""
        return self.size > 1 and self.strategy == "fsdp2"

    @property
    def zero(self) -> bool:
        """Model and optimizer in a DeepSpeed ZeRO engine (`zero_engine`)."""
        return self.size > 1 and self.strategy.startswith("zero")

    @property
    def defers_sync(self) -> bool:
        """DDP: gradients all-reduced in the last micro-batch's backward only (`no_sync` before).
        FSDP2 and ZeRO reduce-scatter every micro-batch's: deferring would hold them whole."""
        return self.size > 1 and self.strategy == "ddp"

    @property
    def lockstep(self) -> bool:
        """Every forward a collective (FSDP2, ZeRO-3): ranks must run the same forwards."""
        return self.size > 1 and self.strategy in ("fsdp2", "zero3")


def _flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() in ("1", "true", "yes")


def strategy() -> str:
    """The strategy of the accelerate config this process was launched with (from the variables
    `accelerate launch` exports): "fsdp2", "zero2" / "zero3" (DeepSpeed's ZeRO stage), or "ddp"
    under torchrun or a config without FSDP or DeepSpeed. FSDP1 is refused: FSDP2 is its
    successor, and the only one that shards per parameter; so are ZeRO stages 0 and 1."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        if stage not in ("2", "3"):
            raise ValueError(f"the accelerate config's deepspeed_config.zero_stage is {stage}: grpo-fast runs ZeRO-2 "
                             "or ZeRO-3 (configs/accelerate/zero2.yaml, zero3.yaml)")
        return f"zero{stage}"
    if _flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ValueError(f"the accelerate config's fsdp_config.fsdp_version is {version}: grpo-fast runs "
                             "FSDP2 (fsdp_version: 2, configs/accelerate/fsdp2.yaml)")
        return "fsdp2"
    return "ddp"


def launched() -> World:
    """The world the launcher's environment describes (RANK, WORLD_SIZE, LOCAL_RANK and the
    accelerate config's strategy), without joining its process group (HF's Trainer joins it
    offline); a world of one without a launcher."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")), strategy())


def setup() -> World:
    """Join the launcher's process group (once per process); a world of one without a launcher."""
    world = launched()
    if world.size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world


def check(cfg, size: int, strategy: str) -> None:
    """Refuse, naming the key, what `strategy` over `size` processes cannot run (ValueError); the
    trainers call it at start, the planner (grpo_fast.plan) before it plans."""
    if size == 1:
        return
    q = cfg.quantization
    if strategy != "ddp" and cfg.mixed_precision == "fp16":
        raise ValueError(f"mixed_precision: fp16 under {strategy} would need a sharded loss scaler: use bf16")
    if strategy == "zero3" and (q.load_in_4bit or q.load_in_8bit):
        raise ValueError(f"quantization.load_in_{4 if q.load_in_4bit else 8}bit: ZeRO-3 partitions every weight, and "
                         "bitsandbytes' quantized ones do not survive it: run QLoRA with configs/accelerate/zero2.yaml "
                         "or ddp.yaml")
    if strategy != "ddp" and cfg.optim != "adamw_torch":
        raise ValueError(f"optim: {cfg.optim} (bitsandbytes) cannot update {strategy}'s sharded parameters: "
                         "use adamw_torch, whose states it shards anyway")
    if strategy != "fsdp2":
        return
    if q.load_in_4bit or q.load_in_8bit:
        raise ValueError(f"quantization.load_in_{4 if q.load_in_4bit else 8}bit: a bitsandbytes base cannot be "
                         "sharded by FSDP2 (fully_shard makes every parameter a DTensor, which drops the "
                         "quantization state): run QLoRA data-parallel, configs/accelerate/ddp.yaml")


def shutdown() -> None:
    """Leave the process group, if this process joined one: each rank's communication threads
    then stop before the interpreter exits (left running, a rank can abort at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def prepare(world: World, cfg, model: torch.nn.Module, scaler):
    """(train_model, optimizer, update) for training `model` under the world's strategy.
    train_model is what the training passes run: the model (a world of one), its DDP wrapper
    (whose backward all-reduces the gradients), the model sharded in place by FSDP2 (`shard`,
    the optimizer then built over the shards), or a ZeRO engine around model and optimizer
    (`zero_engine`); everything else uses the model itself. `update` turns a step's micro-batch
    losses into one optimizer update (TorchUpdate, ZeroUpdate)."""
    if world.zero:
        optimizer = build_optimizer(cfg, model)
        engine = zero_engine(cfg, model, optimizer, micro_batches=cfg.gradient_accumulation_steps)
        return engine, optimizer, ZeroUpdate(engine)
    train_model = model
    if world.sharded:
        shard(model)
    elif world.size > 1:
        device = next(model.parameters()).device
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, model)
    update = TorchUpdate(optimizer, [p for p in model.parameters() if p.requires_grad], scaler, cfg.max_grad_norm)
    return train_model, optimizer, update


def prepare_frozen(world: World, cfg, model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model (a full fine-tune's reference) spread as the policy is: sharded by FSDP2,
    partitioned in a ZeRO-3 engine of its own, else as is (replicated: nothing to reduce)."""
    if world.sharded:
        return shard(model)
    if world.zero and world.strategy == "zero3":
        return zero_engine(cfg, model)
    return model


def zero_config(cfg, micro_batches: int) -> dict:
    """The DeepSpeed config of the launcher's accelerate file (stage, offload devices) for a run
    of `micro_batches` backward passes per optimizer update. Mixed precision stays the trainer's
    autocast (DeepSpeed's bf16 mode would train bf16 weights), clipping is max_grad_norm."""
    stage = int(strategy().removeprefix("zero"))
    zero: dict = {"stage": stage}
    for kind, key in (("optimizer", "offload_optimizer"), ("param", "offload_param")):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none")
        if device != "none":
            zero[key] = {"device": device}
    return {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": micro_batches,
            "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm > 0 else 0.0,
            "zero_optimization": zero, "bf16": {"enabled": False}, "fp16": {"enabled": False},
            # The trainer's own AdamW, also with the optimizer offloaded (DeepSpeed would insist on
            # its compiled CPU Adam).
            "zero_force_ds_cpu_optimizer": False,
            # DeepSpeed's own progress lines: the trainer logs.
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def zero_engine(cfg, model: torch.nn.Module, optimizer=None, micro_batches: int = 1):
    """`model` (and its optimizer) in a DeepSpeed ZeRO engine, from the same weights on every rank
    (the trainer loads them under one seed): ZeRO-2 partitions the optimizer states and gradients,
    ZeRO-3 the weights too (gathered per module as it runs, by hooks on every submodule). Without
    an optimizer: a frozen model (the reference), partitioned like the policy."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=zero_config(cfg, micro_batches))
    if optimizer is not None:
        _TRAINED_ENGINES[id(model)] = engine
    return engine


# The ZeRO engine training each model (by id), for `gathered`: its hooks are the optimizer's.
_TRAINED_ENGINES: dict = {}


def is_zero3(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitions `model`'s parameters (every forward then gathers them)."""
    return bool(_zero3_parameters(model))


def _zero3_parameters(model: torch.nn.Module) -> list:
    """The parameters ZeRO-3 partitions (each carries its `ds_id`), none for another model."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


class TorchUpdate:
    """A step's micro-batch backwards, then one optimizer update: fp16 loss scaling (a no-op
    otherwise), clipping to max_grad_norm, a check of the gradient norm before the weights move,
    AdamW. The single-process, DDP and FSDP2 path."""

    def __init__(self, optimizer, params: list, scaler, max_grad_norm: float):
        self.optimizer, self.params, self.scaler = optimizer, params, scaler
        self.max_norm = max_grad_norm if max_grad_norm > 0 else math.inf

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, check) -> Tensor:
        """Clip and update; `check(grad_norm)` first (it raises to stop). Returns the norm."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = local(torch.nn.utils.clip_grad_norm_(self.params, self.max_norm))
        check(grad_norm)
        self.scaler.step(self.optimizer)  # skips the update on inf/NaN gradients (fp16)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


class ZeroUpdate:
    """The same under a DeepSpeed engine, whose gradient_accumulation_steps is the step's count
    of micro-batches: each backward goes through the engine (losses already normalized, so not
    divided again), whose step() updates (clipped) at the last one. The norm is checked after the
    update: DeepSpeed computes it there."""

    def __init__(self, engine):
        self.engine = engine

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self, check) -> Tensor:
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.tensor(math.nan if norm is None else float(norm))
        check(grad_norm)
        return grad_norm


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 in place, as the accelerate config's FSDP_* variables ask: one `fully_shard` unit
    per decoder layer (the classes in FSDP_TRANSFORMER_CLS_TO_WRAP, default the model's
    `_no_split_modules`), then the root, which holds the embeddings, the final norm and the LM
    head. The root stays gathered from its forward to its backward, which is what lets the
    log-prob kernel read the whole LM head (grpo_fast.logprobs.as_forward runs the kernel inside
    the root's forward). The ranks must hold the same weights before (the trainer loads them
    under one seed): each keeps its slice of dim 0 of every parameter. Gradients are averaged
    by reduce-scatter, as DDP averages them."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    classes = {n.strip() for n in names.split(",") if n.strip()} or _no_split_modules(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"FSDP2: no module of {type(model).__name__} is a {', '.join(sorted(classes)) or '?'} "
                         "(fsdp_transformer_layer_cls_to_wrap in the accelerate config)")
    options = {"reshard_after_forward": _flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
               "offload_policy": CPUOffloadPolicy() if _flag("FSDP_OFFLOAD_PARAMS") else OffloadPolicy()}
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of `model` (every ZeRO-3 parameter) gathered whole for the duration, its
    forwards then free of collectives, and resharded after (a no-op for an unsharded model)."""
    zero3 = _zero3_parameters(model)
    if zero3:
        import deepspeed
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        engine = _TRAINED_ENGINES.get(id(model))
        # A trained model's per-module fetch hooks come off too (DeepSpeed's own helper, which
        # TRL uses): on every decoded token they would cost more than the forward of a small model.
        with unwrap_model_for_generation(engine) if engine is not None else deepspeed.zero.GatheredParameters(zero3):
            yield
        return
    if not isinstance(model, FSDPModule):
        yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # The root stays gathered from forward to backward (FSDP2's own choice for it).
            unit.set_reshard_after_forward(unit is not model and _flag("FSDP_RESHARD_AFTER_FORWARD", "true"),
                                           recurse=False)


@contextlib.contextmanager
def written_by_main(model: torch.nn.Module) -> Iterator[None]:
    """Every ZeRO-3 parameter of `model` gathered whole for the duration, what the main process
    writes into them partitioned again from its values on leaving (DeepSpeed's
    GatheredParameters with modifier_rank 0; every rank must enter). A no-op for another model."""
    zero3 = _zero3_parameters(model)
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0):
        yield


def _no_split_modules(model: torch.nn.Module) -> set[str]:
    """The decoder layer classes a Hugging Face model declares (`_no_split_modules`), looked up
    on the model or the one a PEFT wrapper holds."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def full_state_dict(world: World, model: torch.nn.Module) -> Optional[dict]:
    """The whole state dict of a sharded model on the main process (None elsewhere; every rank
    must call it, it gathers), on the CPU; None for an unsharded model (use its own)."""
    # A tied parameter (embeddings and LM head) is one tensor under all its names, so that it is
    # written once, as the unsharded model writes it.
    tied = _tied_names(model)
    zero3 = _zero3_parameters(model)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3):
            if not world.main:
                return None
            # Copies: the gathered weights are freed on leaving.
            state: dict = {}
            for name, value in model.state_dict().items():
                state[name] = state[tied[name]] if tied.get(name) in state else value.detach().cpu().clone()
            return state
    if not world.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:
        return None
    for name, first in tied.items():
        if name in state and first in state:
            state[name] = state[first]
    return state


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Each later name of a parameter registered under several (a tied LM head), with its first."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(param), name) != name:
            tied[name] = first[id(param)]
    return tied


def optimizer_state_dict(world: World, model: torch.nn.Module, optimizer) -> Optional[dict]:
    """The optimizer's state dict as one process would hold it: whole (on the main process,
    gathered from the shards) under FSDP2, the optimizer's own otherwise; under ZeRO (`model` the
    engine) every rank's partition, in rank order, which a resume under as many ranks reloads.
    Every rank calls it."""
    if world.zero:
        # As plain data, which checkpoints load without running code (`_plain`): the loss scaler
        # (DeepSpeed's fp16 scaling is off) is the optimizer's own again on load, and ZeRO-2's
        # parameter-slice map is for DeepSpeed's universal checkpoints, which a resume never reads.
        state = {**model.optimizer.state_dict(), "loss_scaler": None}
        state.pop("param_slice_mappings", None)
        return {"zero_partitions": gather_objects(world, _plain(state))}
    if not world.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if world.main else None


def _plain(value):
    """`value` as tensors, numbers, strings and containers only: an int enum (DeepSpeed's ZeRO
    stage) as its number, a named tuple (its parameter-fragment addresses) as a tuple."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value] if type(value) is list else tuple(_plain(v) for v in value)
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, (Tensor, bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} of the ZeRO optimizer's state")


def load_optimizer_state_dict(world: World, model: torch.nn.Module, optimizer, state: dict) -> None:
    """Restore what `optimizer_state_dict` saved; under FSDP2 each rank keeps its shard of it,
    under ZeRO its partition (and the fp32 master weights kept there)."""
    if world.zero:
        partitions = state["zero_partitions"]
        if len(partitions) != world.size:
            raise ConfigError(f"the checkpoint holds {len(partitions)} ZeRO partitions: resume under as many "
                              f"processes, not {world.size}")
        partitions = [{**part, "loss_scaler": model.optimizer.loss_scaler} for part in partitions]
        model.optimizer.load_state_dict(partitions, load_optimizer_states=True, load_from_fp32_weights=True)
        return
    if not world.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def all_true(world: World, flag: bool) -> bool:
    """Whether `flag` holds on every rank (a collective; `flag` itself in a world of one)."""
    if world.size == 1:
        return flag
    value = torch.tensor([0 if flag else 1], device=_collective_device())
    dist.all_reduce(value)
    return int(value) == 0


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def local(value: Tensor) -> Tensor:
    """A DTensor's whole value (a reduction FSDP2 leaves sharded or pending), else `value`."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def gather_tensor(world: World, tensor: Tensor) -> Tensor:
    """Every rank's `tensor` (same shape on each) concatenated along dim 0, in rank order."""
    if world.size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_objects(world: World, obj) -> list:
    """Every rank's picklable `obj`, in rank order."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def sum_across(world: World, value: Tensor) -> Tensor:
    """The sum of `value` over ranks (a new tensor)."""
    value = value.clone()
    if world.size > 1:
        dist.all_reduce(value)
    return value


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
