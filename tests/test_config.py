"""Config loading: the seed's keys, overrides, and errors that name the file and key."""

import pytest

from grpo_fast.cli import main
from grpo_fast.config import Config, ConfigError, config_from_dict, load_config

SEED_YAML = """\
model_path: gpt2
lora_path: path/to/lora/checkpoint
dataset_path: data/grpo_dataset.json
output_dir: grpo_outputs/
max_seq_length: 512
batch_size: 8
num_epochs: 3
logging_dir: logs/
"""


def test_seed_example_config_loads(tmp_path):
    path = tmp_path / "grpo_config.yaml"
    path.write_text(SEED_YAML)
    cfg = load_config(path)
    assert cfg.model_path == "gpt2"
    assert cfg.lora_path == "path/to/lora/checkpoint"
    assert cfg.dataset_path == "data/grpo_dataset.json"
    assert cfg.output_dir == "grpo_outputs/"
    assert (cfg.max_seq_length, cfg.batch_size, cfg.num_epochs) == (512, 8, 3.0)
    assert cfg.logging_dir == "logs/"
    # The seed's documented defaults.
    assert (cfg.logging_steps, cfg.save_steps, cfg.save_total_limit) == (20, 500, 2)


@pytest.mark.parametrize("path", ["configs/tiny-offline.yaml"])
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_overrides_nested_and_scientific_notation():
    cfg = config_from_dict({"dataset_path": "x", "learning_rate": "1e-4"},
                           ["lora.r=4", "online.beta=0.04", "lora.target_modules=[q_proj, v_proj]",
                            "num_epochs=2"])
    assert cfg.learning_rate == pytest.approx(1e-4)
    assert cfg.lora.r == 4 and cfg.online.beta == pytest.approx(0.04)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.num_epochs == 2.0


@pytest.mark.parametrize("data, overrides, message", [
    ({"dataset_path": "x", "lr": 1}, [], "unknown key 'lr'; allowed keys here: mode"),
    ({"dataset_path": "x", "lora": {"rank": 4}}, [], "unknown key 'lora.rank'"),
    ({"dataset_path": "x", "mode": "both"}, [], "mode: expected one of 'offline', 'online'"),
    ({"dataset_path": "x", "batch_size": "eight"}, [], "batch_size: expected int"),
    ({"dataset_path": "x", "batch_size": 0}, [], "batch_size: must be >= 1"),
    ({"dataset_path": "x", "learning_rate": -1.0}, [], "learning_rate: must be a finite number > 0"),
    ({"dataset_path": "x", "offline": {"kl_direction": "sideways"}}, [], "offline.kl_direction"),
    ({"dataset_path": "x"}, ["online.rewards=[{nam: x}]"], "unknown key 'online.rewards[0].nam'"),
    ({}, [], "dataset_path: is required"),
    ({"dataset_path": "x"}, ["lora"], "expected KEY=VALUE"),
    ({"dataset_path": "x", "quantization": {"load_in_4bit": True}, "lora": {"enabled": False}}, [],
     "lora.enabled: quantized (QLoRA) training needs LoRA"),
    ({"dataset_path": "x", "mode": "offline", "offline": {"beta": 0.1}, "lora": {"enabled": False}}, [],
     "offline.beta: the offline reference is the model with its LoRA adapter off"),
])
def test_bad_values_name_the_key(data, overrides, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, overrides, source="cfg.yaml")
    assert str(info.value).startswith(("cfg.yaml: ", "--set "))
    assert message in str(info.value)


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: x\nunknown_key: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'unknown_key'"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset_path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: x\nepochs: 3\n")
    assert main(["eval", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "grpo-fast eval: error:" in err and "unknown key 'epochs'" in err
    assert main(["train", "--config", "configs/tiny-offline.yaml", "--set", "batch_size=0"]) == 2
    assert "batch_size: must be >= 1" in capsys.readouterr().err


def test_the_resolved_config_dump_shows_only_what_the_mode_reads():
    offline = config_from_dict({"dataset_path": "x"}).to_dict(for_mode=True)
    online = config_from_dict({"mode": "online", "dataset_path": "x"}).to_dict(for_mode=True)
    assert "offline" in offline and "max_seq_length" in offline and "online" not in offline
    assert "online" in online and not {"offline", "max_seq_length", "skip_invalid"} & set(online)
    assert "online" in config_from_dict({"dataset_path": "x"}).to_dict(), "the saved config keeps every key"
