"""A TRL user's reward setup runs unchanged: TRL's own `trl.rewards` functions and the docs'
quick-start function (in a module beside the config), on a conversational dataset with a
`solution` column, in a short online run of a tiny local chat model, through the command line.

    pytest tests/test_trl_migration.py
"""

import json
import textwrap

import pytest
import torch
import yaml

from grpo_fast.cli import main
from grpo_fast.config import config_from_dict
from grpo_fast.modeling import load_base_model

pytest.importorskip("trl")
pytest.importorskip("math_verify")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The tiny random-weight Llama saved with a chat template: a local chat model."""
    out = tmp_path_factory.mktemp("chat-model")
    cfg = config_from_dict({"mode": "online", "dataset_path": "x", "model_path": "configs/models/tiny-llama.json"})
    model, tokenizer = load_base_model(cfg, torch.device("cpu"))
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def test_trl_reward_functions_run_unchanged_on_a_conversational_dataset(chat_model, tmp_path, monkeypatch, capsys):
    work = tmp_path / "project"
    work.mkdir()
    # The TRL docs' quick-start reward, conversational form, in a module beside the config.
    (work / "my_rewards.py").write_text(textwrap.dedent('''
        def reward_len(completions, **kwargs):
            return [-abs(20 - len(completion[0]["content"])) for completion in completions]

        async def seen_state(completions, trainer_state, log_metric, log_extra, **kwargs):
            log_metric("my/global_step", float(trainer_state.global_step))
            log_extra("my_note", [f"step {trainer_state.global_step}"] * len(completions))
            return [0.0] * len(completions)
    '''))
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {a}+{a}?"}],
                                        "solution": f"${2 * a}$"}) + "\n" for a in range(4)))
    config = {
        "mode": "online", "model_path": chat_model, "dataset_path": str(data), "output_dir": "out",
        "batch_size": 2, "max_steps": 2, "logging_steps": 1, "save_steps": 100, "seed": 0,
        "learning_rate": 1e-3, "lora": {"enabled": False},
        "online": {"num_generations": 4, "max_prompt_length": 32, "max_completion_length": 8,
                   "log_completions_steps": 1,
                   "rewards": [{"name": "trl.rewards:accuracy_reward"},
                               {"name": "trl.rewards:think_format_reward", "weight": 0.5},
                               {"name": "my_rewards:reward_len", "weight": 0.01},
                               {"name": "my_rewards:seen_state", "weight": 0.0},
                               {"name": "trl.rewards:get_soft_overlong_punishment", "factory": True,
                                "kwargs": {"max_completion_len": 8, "soft_punish_cache": 2}}]}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)                       # not the config's directory: it is searched first
    assert main(["train", "--config", str(work / "config.yaml")]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = ("accuracy_reward", "think_format_reward", "reward_len", "seen_state", "soft_overlong_punishment_reward")
    for name in names:
        assert all(f"rewards/{name}/mean" in r and f"rewards/{name}/std" in r for r in rows), name
    assert [r["my/global_step"] for r in rows] == [0.0, 1.0], "log_metric averaged into the row"
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {c["my_note"] for c in completions} == {"step 0", "step 1"}, "log_extra lands in completions.jsonl"
    # reward_len saw conversational completions: -|20 - len(text)| for the logged text.
    for c in completions:
        assert c["rewards"]["reward_len"] == -abs(20 - len(c["completion"]))
        assert c["rewards"]["think_format_reward"] == 0.0     # random text has no <think> block
