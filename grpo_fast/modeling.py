"""Model and tokenizer loading: hub/local checkpoints, random-weight models from shipped configs,
LoRA (peft), 4/8-bit base weights (bitsandbytes, QLoRA), attention backend choice.

    model, tokenizer = load_model_and_tokenizer(cfg)

`cfg.model_path` is a local directory or hub id (as transformers takes it), or a model *config*
file (`configs/models/*.json`) that is built with random weights next to a byte-level tokenizer
built locally with the `tokenizers` library, so the embedded defaults never need the internet.

`check_model_source` / `check_adapter_source` tell in milliseconds, without the network, whether
a model or adapter path can load at all; every loading error is a one-line `ConfigError` naming
the config key.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from .config import Config, ConfigError

logger = logging.getLogger(__name__)

# Saved next to an adapter trained on a random-weight model: the adapter alone is useless
# without the exact base it was trained on.
BASE_MODEL_DIR = "base_model"

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"

# Any one of these makes a directory's tokenizer loadable; without them transformers builds a
# one-token tokenizer for some model types (Qwen2, GPT-2) and a reshape error follows much later.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

def is_model_config_file(model_path: str) -> bool:
    return model_path.endswith(".json") and Path(model_path).is_file()


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + pad/bos/eos = 259 ids) with no merges: every
    string round-trips, nothing is downloaded."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the 256 byte symbols by the byte they stand for, so id == byte value.
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    for i, tok in enumerate((PAD, BOS, EOS)):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel pre-tokenization uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def resolve_dtype(name: str, device: torch.device, bf16_supported: Optional[bool] = None) -> torch.dtype:
    """`auto`: bfloat16 on a CUDA device that supports it, else float32. `bf16_supported` answers
    for a device that is not this machine's (the planner's card); None asks the device, which
    initializes CUDA."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_supported else torch.float32
    return getattr(torch, name)


def resolve_attn_implementation(requested: str, device: torch.device, dtype: torch.dtype,
                                has_flash: Optional[bool] = None) -> tuple[str, str]:
    """Pick the attention backend; returns (implementation, reason). FlashAttention-2 needs the
    `flash_attn` package, a CUDA device and a half-precision dtype. `has_flash` answers for a
    machine that is not this one (the planner's); None looks for the package here."""
    if has_flash is None:
        has_flash = importlib.util.find_spec("flash_attn") is not None
    missing = []
    if not has_flash:
        missing.append("the flash_attn package (pip install 'grpo-fast[flash]')")
    if device.type != "cuda":
        missing.append("a CUDA device")
    if dtype not in (torch.bfloat16, torch.float16):
        missing.append("dtype bfloat16 or float16")
    if requested == "flash_attention_2":
        if missing:
            raise ConfigError(f"attn_implementation: flash_attention_2 needs {' and '.join(missing)}")
        return "flash_attention_2", "requested"
    if requested == "auto":
        if not missing:
            return "flash_attention_2", "flash_attn installed, CUDA, half precision"
        return "sdpa", "FlashAttention-2 unavailable: needs " + " and ".join(missing)
    return requested, "requested"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_model_source(model_path: str, what: str = "model_path") -> None:
    """Raise a one-line ConfigError naming `what` unless `model_path` can load: a model config
    .json, a local model directory (config.json and tokenizer files), or a hub id. A hub id must be
    in the Hugging Face cache when downloads are off (HF_HUB_OFFLINE); otherwise transformers
    fetches it. Reads a few file names only: no network, no model."""
    path = Path(model_path)
    if path.is_dir():
        _check_model_dir(path, what)
    elif path.is_file():
        if path.suffix != ".json":
            raise ConfigError(f"{what}: {model_path} is a file, not a model directory or a model config .json")
    elif model_path.endswith(".json") or not _is_hub_id(model_path):
        raise ConfigError(f"{what}: {model_path} does not exist (not a local directory, a model config "
                          f".json, or a hub id)")
    elif _hub_offline() and not _in_hub_cache(model_path):
        raise ConfigError(f"{what}: {model_path} is neither a local directory nor in the Hugging Face "
                          f"cache, and HF_HUB_OFFLINE is set, so it cannot be downloaded")


def check_adapter_source(path: str, what: str = "lora_path", lora: bool = True) -> None:
    """Raise a one-line ConfigError naming `what` unless `path` is a local directory holding a
    LoRA adapter (`lora`) or, for a full fine-tune, a whole saved model."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what}: {path} does not exist")
    if not p.is_dir():
        raise ConfigError(f"{what}: {path} is not a directory")
    if not lora:
        _check_model_dir(p, what)
    elif not (p / "adapter_config.json").is_file():
        raise ConfigError(f"{what}: {path} holds no adapter_config.json (not a LoRA adapter directory)")


def _check_model_dir(path: Path, what: str) -> None:
    if not (path / "config.json").is_file():
        hint = " (it holds a LoRA adapter, not a model)" if (path / "adapter_config.json").is_file() else ""
        raise ConfigError(f"{what}: {path} has no config.json, so it is not a saved model directory{hint}")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{what}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                          f"save the tokenizer next to the model")


def _is_hub_id(name: str) -> bool:
    """`name` or `owner/name`, by the rules transformers applies before asking the hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


@contextmanager
def _one_line_load_errors(source: str, what: str) -> Iterator[None]:
    """transformers and the hub report a model that cannot load as multi-line OSErrors and
    ValueErrors (HF errors are OSErrors); the command line prints a ConfigError as one line."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{what}: {source} could not be loaded: {reason}") from None


def load_tokenizer(path: str, what: str = "model_path") -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    with _one_line_load_errors(path, what):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if len(tokenizer) < 2 or tokenizer.eos_token is None:
        # A backstop for check_model_source: what transformers builds from no tokenizer files.
        raise ConfigError(f"{what}: {path} has no usable tokenizer ({len(tokenizer)} tokens, eos token "
                          f"{tokenizer.eos_token!r}); save the tokenizer next to the model")
    if tokenizer.pad_token is None:
        # Common for base LMs (Llama, GPT-2); padded positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization_config(cfg: Config):
    q = cfg.quantization
    if not (q.load_in_4bit or q.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=q.load_in_4bit,
        load_in_8bit=q.load_in_8bit,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        # The LM head stays in full precision: the fused log-prob kernel reads it directly.
        llm_int8_skip_modules=["lm_head"],
    )


def unpack_cpu_4bit_layout(model) -> int:
    """Keep every bitsandbytes Linear4bit of `model` in its portable layout; returns how many
    modules changed.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight in place, at
    its first forward that is in eval mode with an input not requiring grad, into a CPU-only
    layout, and from then on runs every forward, training ones too, through a bf16 gemv kernel:
    other numerics than the dequantize + matmul used everywhere else, other weight bytes, a crash
    for widths that are not a multiple of its 64 block (reshape) and, on biased linears such as
    Qwen2's q/k/v, an in-place `+= bias` that breaks autograd. Turning it off makes training,
    rollouts and saved weights use one code path and one layout on every CPU. A weight already
    packed is unpacked with bitsandbytes' own inverse."""
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = module.weight
        packed = getattr(weight.quant_state, "packing_format_for_cpu", False)
        if packed:
            # Imported here: bitsandbytes versions without the packed layout lack it.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack

            weight.data, weight.quant_state = unpack(weight.data, weight.quant_state)
        # Absent in bitsandbytes versions without the packed layout.
        if packed or getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    if changed:
        logger.info("bitsandbytes: packed CPU 4-bit layout (AVX512-BF16) turned off on %d linears, so every "
                    "forward dequantizes the same weights", changed)
    return changed


def load_base_model(cfg: Config, device: Optional[torch.device] = None, base_dir: Optional[str] = None):
    """The base causal LM (no adapter) and its tokenizer. `base_dir` (a saved base_model/, or a
    full fine-tune's output: the adapter path) takes precedence over cfg.model_path."""
    device = device or default_device()
    dtype = resolve_dtype(cfg.dtype, device)
    attn, reason = resolve_attn_implementation(cfg.attn_implementation, device, dtype)
    logger.info("attention: %s (%s)", attn, reason)
    quant = _quantization_config(cfg)
    source = base_dir or cfg.model_path
    what = "model_path" if base_dir is None else "lora_path"
    if base_dir is None and is_model_config_file(cfg.model_path):
        if quant is not None:
            raise ConfigError("quantization: a random-weight model built from a config file cannot be "
                              "loaded quantized; save it first (grpo-fast saves base_model/) and point "
                              "model_path there")
        try:
            model_cfg = AutoConfig.for_model(**json.loads(Path(cfg.model_path).read_text()))
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            raise ConfigError(f"model_path: {cfg.model_path} is not a valid model config: {e}") from None
        tokenizer = build_byte_tokenizer()
        if model_cfg.vocab_size < len(tokenizer):
            raise ConfigError(f"model_path: {cfg.model_path} has vocab_size {model_cfg.vocab_size} "
                              f"< {len(tokenizer)} byte-level tokenizer ids")
        model_cfg.pad_token_id = tokenizer.pad_token_id
        model_cfg.bos_token_id = tokenizer.bos_token_id
        model_cfg.eos_token_id = tokenizer.eos_token_id
        # Seeded so that a resumed run rebuilds the very base its checkpoint's adapter was trained on.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_config(model_cfg, dtype=dtype, attn_implementation=attn)
        logger.info("built %s with random weights from %s", type(model).__name__, cfg.model_path)
    else:
        check_model_source(source, what)
        tokenizer = load_tokenizer(source, what)
        kwargs = dict(dtype=dtype, attn_implementation=attn)
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        with _one_line_load_errors(source, what):
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if cfg.quantization.load_in_4bit:
            unpack_cpu_4bit_layout(model)
    if quant is None:
        model.to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model_and_tokenizer(cfg: Config, device: Optional[torch.device] = None,
                             adapter_path: Optional[str] = None, trainable: bool = True,
                             output_dir: Optional[str] = None):
    """Base model + LoRA (fresh, or from `adapter_path` / cfg.lora_path) ready for training.

    Returns (model, tokenizer). With cfg.lora.enabled false, the full model is trained. When the
    base was built with random weights and `output_dir` is given, the base is saved to
    `output_dir/base_model/` before the adapter wraps it (a few MB for the shipped tiny configs),
    so the adapter can always be loaded onto the exact base it was trained on."""
    adapter_path = adapter_path or cfg.lora_path
    if adapter_path:
        # Before importing peft (seconds): a wrong path is told at once.
        check_adapter_source(adapter_path, lora=cfg.lora.enabled)
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    base_dir = None
    if adapter_path and (Path(adapter_path) / BASE_MODEL_DIR).is_dir():
        base_dir = str(Path(adapter_path) / BASE_MODEL_DIR)
    if adapter_path and not cfg.lora.enabled and not base_dir:
        # A full fine-tune saves the whole model: load it as the model.
        base_dir = adapter_path
    model, tokenizer = load_base_model(cfg, device, base_dir=base_dir)
    if output_dir and base_dir is None and is_model_config_file(cfg.model_path) and cfg.lora.enabled:
        target = Path(output_dir) / BASE_MODEL_DIR
        # A fresh run writes it anew (one left by a run that died before anything else was saved
        # may come from another seed); a resumed run keeps the one its checkpoints were trained on.
        if not adapter_path or not (target / "config.json").is_file():
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
    if cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit:
        # Not peft's prepare_model_for_kbit_training: it casts every unquantized weight
        # (embeddings, LM head, norms, biases) to fp32, which doubles them and makes the residual
        # stream, the KV cache and every saved activation fp32 (grpo-fast plan: ~30% less peak
        # memory for the 1.5B preset at the same batch without it). Freezing the base is all
        # QLoRA needs; the adapters peft adds stay fp32.
        for p in model.parameters():
            p.requires_grad_(False)
    if cfg.lora.enabled:
        if adapter_path:
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
        else:
            # Seeded: the same config gives the same initial adapter, run after run.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = get_peft_model(model, PeftLoraConfig(
                    r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                    target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            # Non-reentrant checkpointing of a frozen embedding needs grads flowing into the
            # first layer's inputs, or no LoRA gradient reaches the checkpointed blocks.
            model.enable_input_require_grads()
    if not trainable:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("parameters: %s trainable of %s (%.2f%%)", f"{n_train:,}", f"{n_all:,}",
                100.0 * n_train / max(n_all, 1))
    return model, tokenizer
