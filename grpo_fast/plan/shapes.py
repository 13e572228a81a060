"""Model shapes for the planner: the sizes of a Llama-style decoder, read from its config alone
(nothing downloaded, no weights, no transformers import).

    from grpo_fast.plan import model_shape
    shape = model_shape("Qwen/Qwen2.5-1.5B-Instruct")   # or a config .json, or a model directory
    shape.num_params, shape.linear_shapes()

`model_shape` tries, in order: a config file, a local directory's config.json, the Hugging Face
cache (`local_files_only`), and the shapes shipped in the package (`grpo_fast.model_configs`,
the repository's configs/models/) for the hub ids in `HUB_SHAPES`. The shipped shapes are read
through importlib.resources, so they are found from any directory and from an installed wheel.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Optional

from ..config import ConfigError

# The shipped shapes: configs/models/ in a source checkout, grpo_fast/model_configs/ in a wheel.
SHAPES_DIR = files("grpo_fast.model_configs")

# Hub ids (lower case) whose shape ships in SHAPES_DIR; base and Instruct share a shape.
HUB_SHAPES = {
    f"{repo}{suffix}".lower(): f"{name}.json"
    for repo, name in (
        ("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b"),
        ("Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b"),
        ("Qwen/Qwen2.5-3B", "qwen2.5-3b"),
        ("Qwen/Qwen2.5-7B", "qwen2.5-7b"),
        ("meta-llama/Llama-3.2-1B", "llama-3.2-1b"),
        ("meta-llama/Llama-3.2-3B", "llama-3.2-3b"),
    )
    for suffix in ("", "-Instruct")
}

# The linear layers of a Llama-style block, grouped by the input they share.
ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
LINEARS = ATTN_IN + ("o_proj",) + MLP_IN + ("down_proj",)


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a Llama-style decoder's config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 0
    model_type: str = "llama"
    # Where the shape was read from, for the report.
    source: str = dataclasses.field(default="", compare=False)

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params_per_layer(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    @property
    def unquantized_params(self) -> int:
        """Embeddings, LM head (when untied), norms and biases: never quantized."""
        h = self.hidden_size
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        norms = (2 * self.num_layers + 1) * h
        bias = (self.qkv_bias * (self.q_dim + 2 * self.kv_dim) + self.o_bias * h
                + self.mlp_bias * (2 * self.intermediate_size + h))
        return embeddings + norms + self.num_layers * bias

    @property
    def num_params(self) -> int:
        return self.num_layers * self.linear_params_per_layer + self.unquantized_params


def shape_from_config(config, source: str = "") -> ModelShape:
    """ModelShape of a transformers config (or a plain dict of config.json fields)."""
    if isinstance(config, dict):
        config = config.get("text_config") or config
        get = config.get
        model_type = config.get("model_type", "")
    else:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = getattr(config, "model_type", "")

        def get(key, default=None):
            return getattr(config, key, default)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if get(k) is None]
    if missing:
        raise ConfigError(f"model_path: {source or 'the model config'} lacks {', '.join(missing)}; "
                          "the planner needs a Llama-style decoder config")
    if get("num_experts") or get("num_local_experts"):
        raise ConfigError(f"model_path: {source} is a mixture-of-experts model; the planner models "
                          "dense Llama-style decoders only")
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    attention_bias = bool(get("attention_bias", False))
    # Qwen2 hard-codes biases on q/k/v (not o); Llama-style configs say so in attention_bias.
    qwen2 = model_type == "qwen2"
    return ModelShape(
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(get("intermediate_size")),
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim") or hidden // heads),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=qwen2 or attention_bias,
        o_bias=attention_bias and not qwen2,
        mlp_bias=bool(get("mlp_bias", False)),
        max_position_embeddings=int(get("max_position_embeddings") or 0),
        model_type=model_type or "llama",
        source=source,
    )


def _read_json(path) -> dict:
    """A config.json as a dict; `path` is a Path or an importlib.resources Traversable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"model_path: cannot read model config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model_path: {path} is not a JSON object")
    return data


def _cached_config(model_path: str) -> Optional[Path]:
    """config.json of a hub model in the local Hugging Face cache, never touching the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model_path, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def model_shape(model_path: str) -> ModelShape:
    """The shape of `model_path`, read without downloading or allocating anything: a config file
    (configs/models/*.json), a local checkpoint directory, the Hugging Face cache, or a hub id
    with a shipped shape (HUB_SHAPES). Raises ConfigError saying what was tried.

    config.json is read as plain JSON; fields a config may leave out take transformers' Llama
    defaults (kv heads = heads, head_dim = hidden / heads, untied embeddings)."""
    path = Path(model_path)
    if path.is_file():
        return shape_from_config(_read_json(path), source=str(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model_path: {model_path} is a directory without config.json")
        return shape_from_config(_read_json(path / "config.json"), source=str(path / "config.json"))
    cached = _cached_config(model_path)
    if cached is not None:
        return shape_from_config(_read_json(cached), source=f"{model_path} (Hugging Face cache)")
    shipped = HUB_SHAPES.get(model_path.lower())
    if shipped is not None:
        # Labelled by its place in the repository, where a reader can open it.
        return shape_from_config(_read_json(SHAPES_DIR / shipped), source=f"configs/models/{shipped}")
    known = sorted(k for k in HUB_SHAPES if not k.endswith("-instruct"))
    raise ConfigError(
        f"model_path: no shape for {model_path!r}: it is not a config file, a local directory or a "
        f"model in the Hugging Face cache, and no shape ships for it (shipped: {', '.join(known)} "
        f"and their -Instruct variants). Point model_path at a config.json, or fetch the model's "
        f"config once: huggingface-cli download {model_path} config.json")
