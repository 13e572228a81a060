"""`report_to` trackers without a network: W&B in offline mode and Trackio's local store get every
logged row of an online run, and the offline trainer's HF integrations write theirs; a missing
package is a one-line config error before any model loads.

    pytest tests/test_trackers.py
"""

import json
import sqlite3

import pytest

from grpo_fast import trackers
from grpo_fast.cli import main, train
from grpo_fast.config import ConfigError, config_from_dict


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{w}=", "answer": w}) + "\n" for w in ("ab", "cd")))
    return str(path)


def online_cfg(prompts_file, tmp_path, report_to):
    return config_from_dict({
        "mode": "online", "dataset_path": prompts_file, "output_dir": str(tmp_path / "run"),
        "batch_size": 2, "max_steps": 3, "logging_steps": 1, "save_steps": 100, "seed": 0,
        "report_to": report_to, "lora": {"r": 4, "alpha": 8},
        "online": {"num_generations": 4, "max_prompt_length": 8, "max_completion_length": 4,
                   "log_completions_steps": 0, "rewards": [{"name": "grpo_fast.tasks:char_match"}]}})


def test_wandb_offline_run_gets_every_row(prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(online_cfg(prompts_file, tmp_path, "wandb"))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run file is protobuf records (what `wandb sync` uploads): every logged row's keys are in
    # it as strings, once per history row (and again in the summary).
    (record_file,) = runs[0].glob("run-*.wandb")
    data = record_file.read_bytes()
    assert data.count(b"rewards/char_match/mean") >= 3 and data.count(b"completions/mean_length") >= 3


def test_trackio_local_store_gets_every_row(prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setattr("trackio.utils.TRACKIO_DIR", tmp_path / "trackio", raising=False)
    monkeypatch.setattr("trackio.sqlite_storage.TRACKIO_DIR", tmp_path / "trackio", raising=False)
    train(online_cfg(prompts_file, tmp_path, "trackio"))
    dbs = list((tmp_path / "trackio").rglob("*.db"))
    assert dbs, "trackio wrote its local store"
    with sqlite3.connect(dbs[0]) as db:
        rows = db.execute("SELECT step, metrics FROM metrics").fetchall()
    steps = sorted(step for step, _ in rows)
    assert steps[-3:] == [1, 2, 3] and all("reward" in json.loads(m) for _, m in rows)


def test_a_missing_tracker_package_is_a_one_line_config_error(prompts_file, tmp_path, monkeypatch, capsys):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the wandb package \(pip install 'grpo-fast\[wandb\]'\)"):
        train(online_cfg(prompts_file, tmp_path, "wandb"))
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(online_cfg(prompts_file, tmp_path / "other", "wandb").to_dict()))
    assert main(["train", "--config", str(cfg)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "other").exists(), "nothing written before the error"


def test_offline_mode_hands_report_to_hfs_integrations(tmp_path):
    """Offline training reports through HF Trainer's own integrations (HF's W&B, Trackio and
    TensorBoard callbacks): report_to reaches its TrainingArguments as HF spells it."""
    from grpo_fast.offline import training_arguments

    for tracker in ("wandb", "trackio", "tensorboard"):
        cfg = config_from_dict({"mode": "offline", "dataset_path": "x", "output_dir": str(tmp_path),
                                "report_to": tracker})
        assert training_arguments(cfg).report_to == [tracker]
    assert training_arguments(config_from_dict({"dataset_path": "x", "output_dir": str(tmp_path)})).report_to == []
