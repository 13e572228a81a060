"""configs/arithmetic-grpo.yaml end to end on the shipped warm-start: a few GRPO steps log the
reward and the held-out eval/accuracy, and `grpo-fast eval` scores the checkpoint itself.

    pytest tests/test_arithmetic_grpo.py
"""

import json
from pathlib import Path

import pytest
import torch

from grpo_fast.cli import main
from grpo_fast.config import load_config
from grpo_fast.online import train_online

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "arithmetic-grpo.yaml")
SFT = ROOT / "examples" / "arithmetic" / "sft-30"
# Paths in the config are relative to the repo root; the tests may run from anywhere.
PATHS = [f"model_path={SFT}", f"dataset_path={SFT / 'train.jsonl'}", f"eval_dataset_path={SFT / 'eval.jsonl'}"]


@pytest.fixture(autouse=True)
def one_thread():
    """As the config's cpu_threads: 1 (which only the CLI applies); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_few_steps_log_reward_and_eval_accuracy(tmp_path):
    cfg = load_config(CONFIG, PATHS + [f"output_dir={tmp_path}", "max_steps=4", "logging_steps=2",
                                       "online.eval_steps=2", "online.eval_max_samples=40"])
    assert (cfg.learning_rate, cfg.batch_size, cfg.online.num_generations) == (3e-5, 8, 8)
    train_online(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["reward"] <= 1.0 and "rewards/exact_match/mean" in r for r in train)
    # The warm-start gets about a third right; four steps at lr 3e-5 cannot move that far.
    assert all(0.1 <= r["eval/accuracy"] <= 0.7 for r in evals)


def test_eval_cli_scores_the_warm_start(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", CONFIG, *(a for p in PATHS for a in ("--set", p)),
                 "--output", str(out)]) == 0
    (metrics,) = json.loads(out.read_text())["results"].values()
    assert metrics["accuracy"] == pytest.approx(0.34, abs=0.01)       # 68 of the 200 held-out prompts
    assert "accuracy" in capsys.readouterr().out
