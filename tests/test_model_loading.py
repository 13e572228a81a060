"""Model and adapter paths that cannot load end as one-line ConfigErrors naming the config key,
in milliseconds and without the network: grpo_fast.modeling.check_model_source,
check_adapter_source, and the loaders' own errors (load_base_model, load_model_and_tokenizer).

    pytest tests/test_model_loading.py
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from grpo_fast.config import ConfigError, config_from_dict
from grpo_fast.modeling import (
    check_adapter_source,
    check_model_source,
    load_base_model,
    load_model_and_tokenizer,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "models" / "tiny-llama.json")
TINY_QWEN2 = str(REPO / "configs" / "models" / "tiny-qwen2.json")
CPU = torch.device("cpu")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what save_pretrained writes here


def make_cfg(**overrides):
    return config_from_dict({"mode": "offline", "dataset_path": "unused.jsonl", "seed": 0, **overrides})


def save_model(path: Path, model_config: str = TINY) -> Path:
    model, tokenizer = load_base_model(make_cfg(model_path=model_config), CPU)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny random-weight Llama saved with its tokenizer."""
    return save_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def copy_of_model_dir(model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE set and an empty Hugging Face cache (this machine's is left alone)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def one_line_error(fn, *args, **kwargs) -> str:
    """The message of the ConfigError `fn` raises, checked to be one line and to come at once."""
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    assert time.monotonic() - start < 2.0, "no network, no retries"
    message = str(e.value)
    assert "\n" not in message and e.value.__cause__ is None
    return message


# --------------------------------------------------------------------------------------------
# model_path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["path/to/lora/checkpoint", "./missing", "/no/such/model", "missing.json",
                                  "configs/models/missing.json"])
def test_a_missing_path_that_is_no_hub_id_does_not_exist(path):
    assert one_line_error(check_model_source, path) == (
        f"model_path: {path} does not exist (not a local directory, a model config .json, or a hub id)")
    assert one_line_error(load_base_model, make_cfg(model_path=path), CPU).startswith(f"model_path: {path} does not")


@pytest.mark.parametrize("hub_id", ["gpt2", "acme/tiny-model"])
def test_an_uncached_hub_id_offline_says_hf_hub_offline_is_set(offline, hub_id):
    expected = (f"model_path: {hub_id} is neither a local directory nor in the Hugging Face cache, and "
                f"HF_HUB_OFFLINE is set, so it cannot be downloaded")
    assert one_line_error(check_model_source, hub_id) == expected
    assert one_line_error(load_base_model, make_cfg(model_path=hub_id), CPU) == expected


def test_a_cached_hub_id_offline_and_any_hub_id_online_pass(offline, monkeypatch):
    snapshot = offline / "models--acme--tiny-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (offline / "models--acme--tiny-model" / "refs").mkdir()
    (offline / "models--acme--tiny-model" / "refs" / "main").write_text("abc123")
    check_model_source("acme/tiny-model")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        check_model_source("acme/other-model")
    # Online, transformers downloads what is missing: nothing to tell beforehand.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_model_source("acme/other-model")


def test_a_saved_model_directory_and_a_model_config_file_pass(model_dir):
    check_model_source(str(model_dir))
    check_model_source(TINY)


def test_a_directory_without_tokenizer_files_is_named_before_loading(copy_of_model_dir):
    for name in TOKENIZER_FILES:
        (copy_of_model_dir / name).unlink()
    expected = (f"model_path: {copy_of_model_dir} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                f"tokenizer.model, vocab.json); save the tokenizer next to the model")
    assert one_line_error(check_model_source, str(copy_of_model_dir)) == expected
    assert one_line_error(load_base_model, make_cfg(model_path=str(copy_of_model_dir)), CPU) == expected


def test_a_tokenizer_built_from_nothing_is_refused(tmp_path):
    """What transformers builds for a Qwen2 directory without tokenizer files (one token, no
    vocabulary), should a directory get past check_model_source."""
    path = save_model(tmp_path / "qwen2", TINY_QWEN2)
    for name in TOKENIZER_FILES:
        (path / name).unlink()
    message = one_line_error(load_tokenizer, str(path))
    assert message.startswith(f"model_path: {path} has no usable tokenizer (1 tokens")


def test_a_directory_without_config_json_is_named(copy_of_model_dir):
    (copy_of_model_dir / "config.json").unlink()
    expected = f"model_path: {copy_of_model_dir} has no config.json, so it is not a saved model directory"
    assert one_line_error(check_model_source, str(copy_of_model_dir)) == expected
    assert one_line_error(load_base_model, make_cfg(model_path=str(copy_of_model_dir)), CPU) == expected


def test_an_adapter_directory_as_model_path_says_so(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    assert one_line_error(check_model_source, str(tmp_path), "model_path") == (
        f"model_path: {tmp_path} has no config.json, so it is not a saved model directory "
        f"(it holds a LoRA adapter, not a model)")


def test_a_file_that_is_no_model_config_is_named(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    assert one_line_error(check_model_source, str(path)) == (
        f"model_path: {path} is a file, not a model directory or a model config .json")


@pytest.mark.parametrize("breakage", ["corrupt tokenizer", "no weights", "unknown model type"])
def test_what_transformers_cannot_load_is_one_line_naming_the_key(copy_of_model_dir, breakage):
    """Past the checks, transformers' own (often multi-line) OSError / ValueError."""
    if breakage == "corrupt tokenizer":
        (copy_of_model_dir / "tokenizer.json").write_text("{not json")
    elif breakage == "no weights":
        (copy_of_model_dir / "model.safetensors").unlink()
    else:
        config = json.loads((copy_of_model_dir / "config.json").read_text())
        (copy_of_model_dir / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    message = one_line_error(load_base_model, make_cfg(model_path=str(copy_of_model_dir)), CPU)
    assert message.startswith(f"model_path: {copy_of_model_dir} could not be loaded: ")


# --------------------------------------------------------------------------------------------
# lora_path (and a full fine-tune's output, loaded as the model)
# --------------------------------------------------------------------------------------------


def test_adapter_paths_that_hold_no_adapter_are_named(tmp_path):
    missing = str(tmp_path / "path" / "to" / "lora" / "checkpoint")
    assert one_line_error(check_adapter_source, missing) == f"lora_path: {missing} does not exist"
    (tmp_path / "file").write_text("")
    assert one_line_error(check_adapter_source, str(tmp_path / "file"), "--adapter") == (
        f"--adapter: {tmp_path / 'file'} is not a directory")
    assert one_line_error(check_adapter_source, str(tmp_path)) == (
        f"lora_path: {tmp_path} holds no adapter_config.json (not a LoRA adapter directory)")
    (tmp_path / "adapter_config.json").write_text("{}")
    check_adapter_source(str(tmp_path))


def test_a_full_fine_tune_output_must_be_a_whole_model(model_dir, copy_of_model_dir):
    check_adapter_source(str(model_dir), lora=False)
    (copy_of_model_dir / "tokenizer.json").unlink()
    (copy_of_model_dir / "tokenizer_config.json").unlink()
    assert one_line_error(check_adapter_source, str(copy_of_model_dir), lora=False).startswith(
        f"lora_path: {copy_of_model_dir} has no tokenizer files")


def test_the_loader_checks_lora_path_before_any_model_loads(tmp_path, monkeypatch):
    import grpo_fast.modeling as modeling

    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before lora_path was checked")

    monkeypatch.setattr(modeling, "load_base_model", no_loading)
    missing = str(tmp_path / "checkpoint")
    assert one_line_error(load_model_and_tokenizer, make_cfg(model_path=TINY, lora_path=missing), CPU) == (
        f"lora_path: {missing} does not exist")
    full = make_cfg(model_path=TINY, lora={"enabled": False})
    assert one_line_error(load_model_and_tokenizer, full, CPU, adapter_path=missing) == (
        f"lora_path: {missing} does not exist")
