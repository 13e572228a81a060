"""Typed configuration: nested dataclasses loaded from YAML, validated, with dotted overrides.

    cfg = load_config("configs/tiny-offline.yaml", overrides=["learning_rate=1e-4", "lora.r=8"])

The run-wide keys are flat (`model_path`, `lora_path`, `dataset_path`, `output_dir`,
`max_seq_length`, `batch_size`, `num_epochs`, `logging_dir`, `logging_steps`, `save_steps`,
`save_total_limit`, ...); everything mode-specific lives in a section (`lora`, `quantization`, `offline`,
`online`). Unknown keys and bad values raise `ConfigError` naming the dotted key and what is
allowed, so a typo never silently falls back to a default; an unknown key that is one of TRL's
GRPOConfig names gets the grpo-fast key instead, or why there is none (grpo_fast.trl_fields).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

# The registries the config validates against: the loss types and the rollout backends.
from . import losses
from .rollout import backend_names
from .trl_fields import TRL_FIELDS


class ConfigError(ValueError):
    """A config problem; the message names the file and the dotted key."""


@dataclass
class LoraConfig:
    # LoRA keeps the trainable state tiny: for a 1.5B model, r=16 on all linear layers is
    # ~18M params (~0.3 GB with fp32 Adam states) instead of ~18 GB for full fine-tuning.
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" lets peft pick every linear layer except the LM head (which stays frozen, so
    # the log-prob kernel skips its V x H weight gradient).
    target_modules: Union[str, list[str]] = "all-linear"


@dataclass
class QuantizationConfig:
    # QLoRA: 4-bit NF4 base weights cut a 1.5B model from ~3.1 GB (bf16) to ~0.9 GB.
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    # Double quantization also quantizes the per-block scales: ~0.4 bit/param saved.
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


@dataclass
class OfflineConfig:
    """Listwise offline GRPO on scored completions (see grpo_fast.listwise.listwise_kl_loss)."""

    policy_temperature: float = 1.0
    # Lower sharpens the target towards the best completion; higher flattens it.
    score_temperature: float = 1.0
    # forward = KL(q || p) (mass-covering, what KLDiv(log_p, log_q) computes); reverse = KL(p || q) (mode-seeking).
    kl_direction: Literal["forward", "reverse"] = "forward"
    # Sums favour short completions (fewer negative terms); the mean removes that length bias.
    length_normalize: bool = False
    # Weight of KL(p_ref || p) between the reference's and the policy's group distributions. The
    # reference is the policy with its LoRA adapter off, so beta > 0 needs LoRA.
    beta: float = 0.0
    # A group's K completions share its prompt: run it once, the completions against its KV
    # cache (logprobs.shared_prompt_logprobs; exact up to rounding). Pays off when prompts are
    # long next to the completions; with short prompts and a model whose forward is mostly
    # per-op overhead the second decoder call costs more than it saves (benchmarks/README.md),
    # hence opt-in. Off under gradient checkpointing.
    shared_prompt: bool = False


@dataclass
class RewardSpec:
    """One online reward: a function (`name`) or a reward model (`model`); grpo_fast.rewards
    loads it."""

    # A built-in or "package.module:function", the functions TRL's reward_funcs takes. With
    # `model` it is optional and only renames the model's metrics.
    name: str = ""
    weight: float = 1.0
    # Bound to the function (or passed to the factory, or to the model's from_pretrained).
    kwargs: dict = field(default_factory=dict)
    # A sequence-classification reward model (local dir or hub id) scoring prompt + completion by
    # its logit, as TRL's reward_funcs given a model id.
    model: Optional[str] = None
    # `name` is a factory: called once with `kwargs`, it returns the reward function (for rewards
    # that build state first, such as a verifier or a loaded rubric).
    factory: bool = False
    # Keyword -> dataset column: the function's keyword `k` receives column `columns[k]`, so a
    # function written for `answer` runs on a dataset whose column is `solution`.
    columns: dict = field(default_factory=dict)


@dataclass
class OnlineConfig:
    """DeepSeekMath GRPO: sample G completions per prompt, score, clipped surrogate."""

    num_generations: int = 8
    max_prompt_length: int = 256
    max_completion_length: int = 256
    # The sampling temperature is also the temperature log-probs are computed with, so the
    # ratio exp(logp - logp_old) compares the distribution that was actually sampled.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # Keeps tokens with at least min_p x the top token's probability (None = off). min_p and the
    # repetition penalty shape what is sampled, not what the log-prob pass scores (as in TRL).
    min_p: Optional[float] = None
    # > 1 discourages tokens already in the prompt or completion (HF's penalty); 1 = off.
    repetition_penalty: float = 1.0
    # TRL's escape hatch for sampling arguments, applied over the keys above. The rollout backend
    # honours what it implements and rejects the rest (hf: temperature, top_p, top_k, min_p,
    # repetition_penalty), so an ignored key is never silent.
    generation_kwargs: dict = field(default_factory=dict)
    # Extra keywords of the tokenizer's apply_chat_template where prompts are rendered, e.g.
    # {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict = field(default_factory=dict)
    # Which rollout backend generates the completions (grpo_fast/rollout/): `hf` decodes with the
    # policy's own forward, `vllm` runs a vLLM engine in this process (pip install 'grpo-fast[vllm]').
    generation_backend: str = "hf"
    # ZeRO-3 and FSDP2 (TRL's name): gather the sharded policy whole for each hf rollout, one
    # all-gather per layer instead of one per layer and decoded token (benchmarks/README.md has
    # the timing); false decodes sharded, for a policy one GPU cannot hold whole.
    ds3_gather_for_generation: bool = True
    # TRL's spelling: true is generation_backend: vllm.
    use_vllm: bool = False
    # Where the vllm backend's engine runs. colocate: in the trainer's process, on its GPU (TRL's
    # default too; nothing else to start). server: a `grpo-fast vllm-serve --config <this file>`
    # on other GPUs or another host, which the trainer sends prompts and the current policy to
    # over HTTP; it is also what runs under several trainer processes (torchrun / accelerate).
    vllm_mode: Literal["colocate", "server"] = "colocate"
    # The server's address: vllm_server_base_url (e.g. http://10.0.0.2:8000) when set, else
    # http://{vllm_server_host}:{vllm_server_port}; `grpo-fast vllm-serve` listens on the host
    # and port too (TRL's defaults, so 0.0.0.0 listens everywhere and reaches this machine).
    vllm_server_base_url: Optional[str] = None
    vllm_server_host: str = "0.0.0.0"
    vllm_server_port: int = 8000
    # Seconds the trainer waits for the server to answer at start-up (it may still be loading).
    vllm_server_timeout: float = 240.0
    # vLLM engine (generation_backend: vllm). The share of GPU memory vLLM takes for its weights
    # and KV cache (TRL's default); on CPU the KV cache is sized to the run's rollouts instead.
    vllm_gpu_memory_utilization: float = 0.3
    # Longest prompt + completion the engine serves; None = max_prompt_length + max_completion_length.
    vllm_max_model_length: Optional[int] = None
    # GPU only: the engine frees its KV cache and offloads its weights while the trainer trains,
    # and wakes for each rollout (peak memory is then the larger phase, not their sum).
    vllm_enable_sleep_mode: bool = False
    vllm_tensor_parallel_size: int = 1
    # vLLM's numerics differ from the training forward, so its samples are slightly off-policy:
    # the loss is weighted by the importance ratio exp(trainer logp - vLLM logp) (TRL's defaults).
    vllm_importance_sampling_correction: bool = True
    # token_* (one ratio per token) or sequence_* (the product over the completion); *_truncate
    # clamps the ratio to [clip_min, clip_max], *_mask zeroes the weight of what falls outside.
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate",
                                           "sequence_mask"] = "sequence_mask"
    vllm_importance_sampling_clip_max: Optional[float] = 3.0
    vllm_importance_sampling_clip_min: Optional[float] = None
    # A name registered in grpo_fast.losses (LOSS_TYPES lists them; a plugin can register more).
    loss_type: str = "dapo"
    # TRL's `epsilon` is epsilon_low; TRL's epsilon_high defaults to epsilon, ours to 0.2.
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    # Two-sided clipping (INTELLECT-2): the unclipped ratio is also capped at delta, so a token of
    # negative advantage with a huge ratio cannot blow up the loss. None = off; when set it must
    # exceed 1 + epsilon_high (TRL's recommendation, enforced: below it cuts into the clip range).
    delta: Optional[float] = None
    # token: one ratio per token (GRPO); sequence: exp of the mean log-ratio over the completion,
    # one per sequence (GSPO, steadier with sequence-level rewards).
    importance_sampling_level: Literal["token", "sequence"] = "token"
    # Multiplies the k3 KL term by the ratio, making its gradient the unbiased reverse-KL gradient
    # (DeepSeek-V3.2). With beta > 0 it changes the gradient even on-policy, where the ratio is 1
    # in value but not in gradient.
    use_bias_correction_kl: bool = True
    # SAPO's soft gate (loss_type: sapo) in place of clipping: its temperature for tokens of
    # positive / non-positive advantage.
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    # VESPO's Gamma weight e^λ w^k e^(-λw) of the sequence ratio w (loss_type: vespo), for positive
    # / negative advantages: k sets how hard w < 1 is down-weighted, λ how hard w > 1 is.
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    # Completions cut at max_completion_length leave the loss (DAPO): being unfinished does not
    # make an answer bad, and penalising it adds noise.
    mask_truncated_completions: bool = False
    # Only this top quantile of completion tokens by entropy enters the policy loss (Beyond the
    # 80/20 Rule recommends 0.2; 1 = every token, 0 = the highest-entropy one).
    top_entropy_quantile: float = 1.0
    # beta = 0 skips the reference forward entirely (DAPO / Dr. GRPO practice).
    beta: float = 0.0
    # TRL's true / false spellings load as group / none (OnlineConfig.__post_init__).
    scale_rewards: Literal["group", "batch", "none", True, False] = "group"
    # mu: optimisation passes over each generated batch; > 1 stores old log-probs.
    num_iterations: int = 1
    # Log-prob forwards run each distinct prompt once and its G completions against its KV
    # cache (logprobs.shared_prompt_logprobs): exact up to rounding, and it saves (G-1)/G of the
    # prompt's compute and activations (README "Online GRPO" has the measured share).
    # Off under gradient checkpointing, which disables HF's KV cache.
    shared_prompt: bool = True
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="math_answer")])
    # Prompt datasets from the hub (needs internet) instead of dataset_path.
    dataset_name: Optional[str] = None
    dataset_config: Optional[str] = None
    dataset_split: str = "train"
    # Column holding the prompt (a string, or a list of chat messages).
    prompt_column: str = "prompt"
    # Instruct models expect their chat format: render string prompts as a user message through
    # the tokenizer's chat template (message-list prompts always are).
    chat_template: bool = False
    # A system message put before every prompt (implies chat_template), e.g. the answer format
    # the format reward checks for.
    system_prompt: Optional[str] = None
    # Sample completions with their rewards are logged every this many steps (0 = never).
    log_completions_steps: int = 50
    # Held-out greedy accuracy every eval_steps (0 = never) on eval_dataset_path.
    eval_steps: int = 0
    eval_max_samples: int = 200
    # None: one greedy completion per eval prompt. n: n completions sampled with the training
    # settings, scored and averaged (TRL samples num_generations_eval, num_generations when None).
    num_generations_eval: Optional[int] = None

    def __post_init__(self):
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if self.use_vllm and self.generation_backend == "hf":
            self.generation_backend = "vllm"


@dataclass
class Config:
    mode: Literal["offline", "online"] = "offline"
    # A local directory, a hub id, or a model config (.json) built with random weights and a
    # local byte-level tokenizer (configs/models/), so nothing needs the internet.
    model_path: str = "configs/models/tiny-llama.json"
    lora_path: Optional[str] = None
    dataset_path: Optional[str] = None
    eval_dataset_path: Optional[str] = None
    output_dir: str = "outputs/run"
    logging_dir: Optional[str] = None
    # Offline only: prompt + completion tokens per sequence, cut from the left (online has
    # online.max_prompt_length and online.max_completion_length).
    max_seq_length: int = 512
    # Per micro-batch: offline, groups of scored completions; online, prompts (each sampled
    # online.num_generations times). See MODE_ONLY_KEYS for the keys only one mode reads.
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    # > 0 overrides num_epochs.
    max_steps: int = -1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    lr_scheduler_type: Literal["constant", "linear", "cosine", "constant_with_warmup"] = "constant"
    max_grad_norm: float = 1.0
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = "adamw_torch"
    seed: int = 42
    logging_steps: int = 20
    save_steps: int = 500
    save_total_limit: int = 2
    # One tracker (TRL takes a list): each needs its package (pip install 'grpo-fast[<name>]').
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    # Weights dtype. "auto" = bfloat16 on a GPU that supports it, else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Autocast the forward/backward to bf16/fp16 while master weights and optimizer states stay
    # fp32 (for dtype float32 weights; fp16 adds dynamic loss scaling).
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    # Log-prob backend of grpo_fast.kernels: auto = fused Triton on CUDA, chunked on CPU.
    logprob_backend: Literal["auto", "triton", "chunked", "naive"] = "auto"
    # CPU threads for torch (0 = torch's default, one per core). Tiny models run fastest on 1:
    # their matmuls are too small to split, and on a busy machine extra threads spin-wait.
    cpu_threads: int = 0
    # Offline data: skip bad records (counted in the log) instead of failing on the first.
    skip_invalid: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)

    def to_dict(self, for_mode: bool = False) -> dict:
        """Every key; with `for_mode`, only those this config's mode reads."""
        data = dataclasses.asdict(self)
        if for_mode:
            for key in MODE_ONLY_KEYS["online" if self.mode == "offline" else "offline"]:
                data.pop(key)
        return data

    def to_yaml(self, for_mode: bool = False) -> str:
        return yaml.safe_dump(self.to_dict(for_mode), sort_keys=False)


# Keys that only one mode reads; the other ignores them. (Keys whose meaning changes with the
# mode: `batch_size` counts groups of scored completions offline and prompts online, each of
# which becomes online.num_generations completions; `num_epochs` passes over the groups or the
# prompts.)
MODE_ONLY_KEYS = {"offline": ("max_seq_length", "skip_invalid", "offline"),
                  "online": ("online",)}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, dicts ->
    dataclasses). Raises ConfigError naming `key` and what is allowed."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif origin is Literal:
        # Compared with the type too: True == 1, and `scale_rewards: 1` is no spelling of `true`.
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 1e-4 as a string (it wants 1.0e-4); users write the former.
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise ConfigError(_unknown_key(dotted, key, names))
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _unknown_key(dotted: str, key: Any, allowed: list[str]) -> str:
    """The error for a key the dataclass lacks; for one of TRL's names, the grpo-fast key or why
    there is none, which helps more than the list of allowed keys."""
    if key not in TRL_FIELDS:
        return f"unknown key '{dotted}'; allowed keys here: {', '.join(allowed)}"
    target, note = TRL_FIELDS[key]
    answer = f"in grpo-fast it is {target}" + (f" ({note})" if note else "") if target else note
    return f"unknown key '{dotted}' (TRL's name): {answer}"


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> Config:
    """Semantic checks the types cannot express. Returns cfg."""
    for key in ("max_seq_length", "batch_size", "gradient_accumulation_steps", "logging_steps",
                "save_steps", "save_total_limit", "lora.r", "lora.alpha",
                "online.num_generations", "online.max_prompt_length",
                "online.max_completion_length", "online.num_iterations"):
        _check(_get(cfg, key) >= 1, key, f"must be >= 1, got {_get(cfg, key)}")
    # One sample per prompt has nothing to be relative to: every advantage would be 0.
    _check(cfg.online.num_generations >= 2, "online.num_generations",
           f"must be >= 2 (advantages are relative to the group), got {cfg.online.num_generations}")
    for key in ("learning_rate", "offline.policy_temperature", "offline.score_temperature",
                "online.temperature", "online.repetition_penalty", "online.sapo_temperature_pos",
                "online.sapo_temperature_neg", "online.vespo_lambda_pos", "online.vespo_lambda_neg"):
        value = _get(cfg, key)
        _check(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {value}")
    for key in ("weight_decay", "max_grad_norm", "offline.beta", "online.beta",
                "online.epsilon_low", "online.epsilon_high", "online.vespo_k_pos", "online.vespo_k_neg"):
        value = _get(cfg, key)
        _check(math.isfinite(value) and value >= 0, key, f"must be >= 0, got {value}")
    _check(cfg.mixed_precision == "no" or cfg.dtype in ("float32", "auto"), "mixed_precision",
           f"needs float32 master weights (dtype: float32), got dtype: {cfg.dtype}")
    _check(cfg.cpu_threads >= 0, "cpu_threads", f"must be >= 0, got {cfg.cpu_threads}")
    _check(cfg.num_epochs > 0 or cfg.max_steps > 0, "num_epochs", "must be > 0 (or set max_steps)")
    _check(0.0 <= cfg.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {cfg.warmup_ratio}")
    _check(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    o = cfg.online
    _check(cfg.online.loss_type in losses.LOSS_TYPES, "online.loss_type",
           f"expected one of {', '.join(map(repr, losses.LOSS_TYPES))}, got {cfg.online.loss_type!r}")
    _check(not o.use_vllm or o.generation_backend == "vllm", "online.use_vllm",
           f"true means generation_backend: vllm, but generation_backend is {o.generation_backend!r}")
    _check(cfg.online.generation_backend in backend_names(), "online.generation_backend",
           f"expected one of {', '.join(map(repr, backend_names()))}, got {cfg.online.generation_backend!r}")
    _check(0.0 < o.vllm_gpu_memory_utilization <= 1.0, "online.vllm_gpu_memory_utilization",
           f"must be in (0, 1], got {o.vllm_gpu_memory_utilization}")
    _check(o.vllm_max_model_length is None or o.vllm_max_model_length >= o.max_prompt_length + o.max_completion_length,
           "online.vllm_max_model_length", f"must be >= max_prompt_length + max_completion_length = "
           f"{o.max_prompt_length + o.max_completion_length} (or null), got {o.vllm_max_model_length}")
    _check(o.vllm_tensor_parallel_size >= 1, "online.vllm_tensor_parallel_size",
           f"must be >= 1, got {o.vllm_tensor_parallel_size}")
    _check(o.vllm_server_base_url is None or re.fullmatch(r"https?://[^/\s]+/?", o.vllm_server_base_url) is not None,
           "online.vllm_server_base_url", f"must be http://HOST:PORT (or null), got {o.vllm_server_base_url!r}")
    _check(1 <= o.vllm_server_port <= 65535, "online.vllm_server_port",
           f"must be a TCP port in [1, 65535], got {o.vllm_server_port}")
    _check(math.isfinite(o.vllm_server_timeout) and o.vllm_server_timeout > 0, "online.vllm_server_timeout",
           f"must be a finite number of seconds > 0, got {o.vllm_server_timeout}")
    _check(not (o.loss_type == "vespo" and o.generation_backend == "vllm" and o.vllm_importance_sampling_correction)
           or o.vllm_importance_sampling_mode.startswith("token"), "online.vllm_importance_sampling_mode",
           "vespo folds the correction into its sequence weight per token: token_truncate or token_mask (as TRL)")
    for key in ("vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min"):
        value = getattr(o, key)
        _check(value is None or (math.isfinite(value) and value >= 0), f"online.{key}",
               f"must be a finite number >= 0 or null, got {value}")
    _check(None in (o.vllm_importance_sampling_clip_min, o.vllm_importance_sampling_clip_max)
           or o.vllm_importance_sampling_clip_min <= o.vllm_importance_sampling_clip_max,
           "online.vllm_importance_sampling_clip_min", "must be <= online.vllm_importance_sampling_clip_max")
    _check(0.0 < cfg.online.top_p <= 1.0, "online.top_p", f"must be in (0, 1], got {cfg.online.top_p}")
    _check(cfg.online.top_k >= 0, "online.top_k", f"must be >= 0, got {cfg.online.top_k}")
    _check(not (cfg.quantization.load_in_4bit and cfg.quantization.load_in_8bit),
           "quantization", "load_in_4bit and load_in_8bit are mutually exclusive")
    _check(not ((cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit)
                and not cfg.lora.enabled),
           "lora.enabled", "quantized (QLoRA) training needs LoRA: quantized weights cannot be trained")
    _check(cfg.lora_path is None or cfg.lora.enabled, "lora_path", "needs lora.enabled: true")
    # The offline reference is the policy with its adapter switched off: no second copy in memory.
    _check(cfg.mode != "offline" or cfg.offline.beta == 0 or cfg.lora.enabled, "offline.beta",
           "the offline reference is the model with its LoRA adapter off: needs lora.enabled: true (or beta 0)")
    _check(0.0 <= o.top_entropy_quantile <= 1.0, "online.top_entropy_quantile",
           f"must be in [0, 1] (1 = every token), got {o.top_entropy_quantile}")
    _check(o.min_p is None or 0.0 <= o.min_p <= 1.0, "online.min_p", f"must be in [0, 1] or null, got {o.min_p}")
    _check(o.delta is None or (math.isfinite(o.delta) and o.delta > 1.0 + o.epsilon_high), "online.delta",
           f"must be > 1 + online.epsilon_high = {1.0 + o.epsilon_high:g} (or null = off), got {o.delta}")
    _check(o.num_generations_eval is None or o.num_generations_eval >= 1, "online.num_generations_eval",
           f"must be >= 1 or null (one greedy completion), got {o.num_generations_eval}")
    for key in ("generation_kwargs", "chat_template_kwargs"):
        _check(all(isinstance(k, str) for k in getattr(o, key)), f"online.{key}",
               f"keys are keyword names and must be strings, got {sorted(map(repr, getattr(o, key)))}")
    for i, spec in enumerate(cfg.online.rewards):
        key = f"online.rewards[{i}]"
        _check(spec.model != "", f"{key}.model", "must be a local directory or hub id, or null")
        _check(bool(spec.name) or spec.model is not None, key,
               "needs name (a reward function) or model (a reward model)")
        for option, value in (("factory", spec.factory), ("columns", spec.columns)):
            _check(spec.model is None or not value, f"{key}.{option}",
                   "is for reward functions: a reward model scores the prompt and completion")
        _check(all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in spec.columns.items()),
               f"{key}.columns", f"must map keyword names to column names (strings), got {spec.columns!r}")
        _check(math.isfinite(spec.weight), f"{key}.weight", "must be finite")
    if cfg.mode == "online":
        _check(len(cfg.online.rewards) > 0, "online.rewards", "online mode needs at least one reward")
        _check(cfg.dataset_path is not None or cfg.online.dataset_name is not None,
               "dataset_path", "online mode needs dataset_path or online.dataset_name")
    else:
        _check(cfg.dataset_path is not None, "dataset_path", "is required")
    return cfg


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value) with the value parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected KEY=VALUE, e.g. learning_rate=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set '{text}': value is not valid YAML: {e}") from None
    return key.split("."), value


def config_from_dict(data: dict, overrides: Optional[list[str]] = None, source: str = "config") -> Config:
    data = dict(data or {})
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set '{text}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    try:
        return validate(_build(Config, data))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> Config:
    """Load, override and validate a YAML config. Errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    cfg = config_from_dict(data, overrides, source=str(path))
    # Where reward modules named in the config are looked for first (not a key: it is where the
    # file is, not what it says).
    cfg.config_dir = str(path.resolve().parent)
    return cfg
