"""Coming from TRL: the options named as TRL 1.16's GRPOConfig names them load with its defaults,
every GRPOConfig field is a grpo-fast key or an unknown key whose error says the grpo-fast key
(or why there is none), and README "Coming from TRL" is the table grpo_fast.trl_fields holds.

    pytest tests/test_config_trl.py
    python tests/test_config_trl.py      # prints the README table, rendered from TRL_FIELDS
"""

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import yaml

from grpo_fast.config import Config, ConfigError, config_from_dict, load_config
from grpo_fast.trl_fields import TRL_FIELDS

README = Path(__file__).resolve().parents[1] / "README.md"
BASE = {"dataset_path": "prompts.jsonl"}

# The options added under TRL's names: their defaults must be TRL's.
TRL_NAMED_OPTIONS = ("min_p", "repetition_penalty", "generation_kwargs", "chat_template_kwargs",
                     "num_generations_eval", "delta", "importance_sampling_level", "use_bias_correction_kl",
                     "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
                     "vespo_k_neg", "vespo_lambda_neg", "mask_truncated_completions", "top_entropy_quantile")

# Keys named as TRL's whose defaults differ on purpose: {TRL field: (TRL's, grpo-fast's)}. The
# README table shows both.
DIFFERENT_DEFAULTS = {
    "output_dir": (None, "outputs/run"),            # TRL's None means trainer_output
    "learning_rate": (1e-6, 1e-4),
    "lr_scheduler_type": ("linear", "constant"),
    "optim": ("adamw_torch_fused", "adamw_torch"),  # fused wherever torch's fused kernel applies
    "gradient_checkpointing": (True, False),
    "logging_steps": (10, 20),                      # the seed's default (tests/test_config.py)
    "save_total_limit": (None, 2),
    "eval_steps": (None, 0),                        # both: no eval
    "max_completion_length": (512, 256),
    "epsilon_high": (None, 0.2),                    # TRL's None means epsilon, whose default is 0.2
}


def trl_defaults() -> dict:
    trl = pytest.importorskip("trl")
    out = {}
    for f in dataclasses.fields(trl.GRPOConfig):
        out[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return out


def lookup(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def error(data: dict, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, **data}, list(overrides), source="cfg.yaml")
    return str(info.value)


# ------------------------------------------------------------------------------------------
# The options named as TRL names them
# ------------------------------------------------------------------------------------------

def test_options_named_as_trl_default_as_trl_does():
    theirs, ours = trl_defaults(), Config()
    same_name = {field: target for field, (target, _) in TRL_FIELDS.items()
                 if target is not None and target.rsplit(".", 1)[-1] == field}
    assert set(TRL_NAMED_OPTIONS) <= set(same_name)
    differing = {}
    for field, target in same_name.items():
        mine, trl_value = lookup(ours, target), theirs[field]
        if isinstance(mine, dict) and not mine and trl_value is None:
            continue  # no extra keywords either way
        if mine != trl_value:
            differing[field] = (trl_value, mine)
    assert differing == DIFFERENT_DEFAULTS
    assert not set(TRL_NAMED_OPTIONS) & set(differing)


def test_options_named_as_trl_load_and_survive_the_yaml_dump():
    online = {"min_p": 0.05, "repetition_penalty": 1.1, "generation_kwargs": {"top_k": 20},
              "chat_template_kwargs": {"enable_thinking": False}, "num_generations_eval": 4,
              "epsilon_high": 0.28, "delta": 4.0, "importance_sampling_level": "sequence",
              "use_bias_correction_kl": False, "sapo_temperature_pos": 0.9, "sapo_temperature_neg": 1.2,
              "vespo_k_pos": 1, "vespo_lambda_pos": 2.5, "vespo_k_neg": 0, "vespo_lambda_neg": 1,
              "mask_truncated_completions": True, "top_entropy_quantile": 0.0, "scale_rewards": False,
              "rewards": [{"model": "org/reward-model", "weight": 0.5},
                          {"model": "org/other-rm", "name": "helpful"},
                          {"name": "pkg.rewards:make_verifier", "factory": True, "kwargs": {"strict": True},
                           "columns": {"answer": "solution"}}]}
    cfg = config_from_dict({**BASE, "report_to": "wandb", "online": online})
    o = cfg.online
    assert (o.min_p, o.delta, o.importance_sampling_level, o.top_entropy_quantile) == (0.05, 4.0, "sequence", 0.0)
    assert isinstance(o.vespo_k_pos, float) and o.chat_template_kwargs == {"enable_thinking": False}
    assert o.scale_rewards == "none", "TRL's false is none"
    assert [(r.name, r.model, r.factory, r.columns) for r in o.rewards] == [
        ("", "org/reward-model", False, {}), ("helpful", "org/other-rm", False, {}),
        ("pkg.rewards:make_verifier", None, True, {"answer": "solution"})]
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("value, expected", [(True, "group"), (False, "none"), ("batch", "batch")])
def test_scale_rewards_takes_trls_booleans(value, expected):
    assert config_from_dict({**BASE, "online": {"scale_rewards": value}}).online.scale_rewards == expected


@pytest.mark.parametrize("online, backend", [({"use_vllm": True}, "vllm"), ({}, "hf"),
                                             ({"generation_backend": "vllm"}, "vllm")])
def test_use_vllm_is_trls_spelling_of_the_vllm_backend(online, backend):
    assert config_from_dict({**BASE, "online": online}).online.generation_backend == backend


@pytest.mark.parametrize("tracker", ["none", "tensorboard", "wandb", "trackio"])
def test_report_to_names_one_tracker(tracker):
    assert config_from_dict({**BASE, "report_to": tracker}).report_to == tracker


@pytest.mark.parametrize("online, message", [
    ({"delta": 1.1}, "online.delta: must be > 1 + online.epsilon_high = 1.2"),
    ({"epsilon_high": 0.28, "delta": 1.25}, "online.delta: must be > 1 + online.epsilon_high = 1.28"),
    ({"importance_sampling_level": "seq"},
     "online.importance_sampling_level: expected one of 'token', 'sequence'"),
    ({"top_entropy_quantile": 1.5}, "online.top_entropy_quantile: must be in [0, 1]"),
    ({"min_p": -0.1}, "online.min_p: must be in [0, 1] or null"),
    ({"repetition_penalty": 0}, "online.repetition_penalty: must be a finite number > 0"),
    ({"sapo_temperature_neg": 0}, "online.sapo_temperature_neg: must be a finite number > 0"),
    ({"vespo_lambda_pos": -1}, "online.vespo_lambda_pos: must be a finite number > 0"),
    ({"vespo_k_neg": -0.5}, "online.vespo_k_neg: must be >= 0"),
    ({"use_bias_correction_kl": "yes"}, "online.use_bias_correction_kl: expected bool"),
    ({"mask_truncated_completions": 1}, "online.mask_truncated_completions: expected bool"),
    ({"num_generations_eval": 0}, "online.num_generations_eval: must be >= 1 or null"),
    ({"generation_kwargs": {1: 2}}, "online.generation_kwargs: keys are keyword names"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "online.chat_template_kwargs: expected dict"),
    ({"scale_rewards": 1}, "online.scale_rewards: expected one of 'group', 'batch', 'none', True, False"),
    ({"rewards": [{"weight": 1.0}]}, "online.rewards[0]: needs name (a reward function) or model"),
    ({"rewards": [{"model": ""}]}, "online.rewards[0].model: must be a local directory or hub id"),
    ({"rewards": [{"model": "org/rm", "factory": True}]}, "online.rewards[0].factory: is for reward functions"),
    ({"rewards": [{"model": "org/rm", "columns": {"a": "b"}}]},
     "online.rewards[0].columns: is for reward functions"),
    ({"rewards": [{"name": "f", "columns": {"answer": 3}}]}, "online.rewards[0].columns: must map keyword names"),
    ({"use_vllm": True, "generation_backend": "mine"}, "online.use_vllm: true means generation_backend: vllm"),
    ({"vllm_gpu_memory_utilization": 0}, "online.vllm_gpu_memory_utilization: must be in (0, 1]"),
    ({"vllm_max_model_length": 16}, "online.vllm_max_model_length: must be >= max_prompt_length + "
                                    "max_completion_length = 512"),
    ({"vllm_tensor_parallel_size": 0}, "online.vllm_tensor_parallel_size: must be >= 1"),
    ({"vllm_importance_sampling_mode": "token"}, "online.vllm_importance_sampling_mode: expected one of "
                                                 "'token_truncate', 'token_mask', 'sequence_truncate', 'sequence_mask'"),
    ({"vllm_importance_sampling_clip_max": -1.0}, "online.vllm_importance_sampling_clip_max: must be a finite number >= 0"),
    ({"vllm_importance_sampling_clip_min": 4.0}, "online.vllm_importance_sampling_clip_min: must be <= "
                                                 "online.vllm_importance_sampling_clip_max"),
    ({"use_vllm": True, "loss_type": "vespo"}, "online.vllm_importance_sampling_mode: vespo folds the correction"),
])
def test_bad_values_of_the_trl_named_options_name_the_key(online, message):
    assert message in error({"online": online})


def test_report_to_lists_the_trackers():
    assert "report_to: expected one of 'none', 'tensorboard', 'wandb', 'trackio'" in error({"report_to": "mlflow"})


# ------------------------------------------------------------------------------------------
# Every GRPOConfig field: a grpo-fast key, or an error that says which one (or why none)
# ------------------------------------------------------------------------------------------

def test_the_table_covers_exactly_the_fields_of_grpo_config():
    assert set(TRL_FIELDS) == set(trl_defaults())


@pytest.mark.parametrize("field, entry", TRL_FIELDS.items(), ids=list(TRL_FIELDS))
def test_each_entry_names_a_real_key_or_says_why_not(field, entry):
    target, note = entry
    if target is None:
        assert note.startswith(("not used: ", "not supported: ", "not supported yet: ", "not a config key: "))
    else:
        lookup(Config(), target)  # an AttributeError here: the table names a key that does not exist


@pytest.mark.parametrize("field", list(TRL_FIELDS))
def test_each_trl_field_at_top_level_is_a_key_or_answers_with_the_grpo_fast_key(field):
    target, note = TRL_FIELDS[field]
    if field in {f.name for f in dataclasses.fields(Config)}:
        assert target == field, "a top-level key named as TRL's is TRL's"
        return
    message = error({field: None})
    prefix = f"cfg.yaml: unknown key '{field}' (TRL's name): "
    assert message.startswith(prefix)
    if target is None:
        assert message == prefix + note
    else:
        assert message.startswith(prefix + f"in grpo-fast it is {target}")
        if target == f"online.{field}":
            assert "online." + field in message, "a section's key named as TRL's says its section"


@pytest.mark.parametrize("field", list(TRL_FIELDS))
def test_each_trl_field_in_the_online_section_is_a_key_or_answers_likewise(field):
    if field in {f.name for f in dataclasses.fields(Config().online)}:
        assert TRL_FIELDS[field][0] == f"online.{field}"
        return
    assert error({"online": {field: None}}).startswith(f"cfg.yaml: unknown key 'online.{field}' (TRL's name): ")


@pytest.mark.parametrize("data, message", [
    ({"per_device_train_batch_size": 8},
     "unknown key 'per_device_train_batch_size' (TRL's name): in grpo-fast it is batch_size (it counts prompts, "
     "each sampled online.num_generations times: per_device_train_batch_size / num_generations"),
    ({"use_vllm": True},
     "unknown key 'use_vllm' (TRL's name): in grpo-fast it is online.use_vllm (or online.generation_backend: vllm)"),
    ({"vllm_gpu_memory_utilization": 0.5}, "in grpo-fast it is online.vllm_gpu_memory_utilization"),
    ({"vllm_mode": "server"}, "in grpo-fast it is online.vllm_mode"),
    ({"fsdp": "full_shard"}, "not used: the accelerate config file chooses DDP, FSDP2 or DeepSpeed"),
    ({"beta": 0.04}, "unknown key 'beta' (TRL's name): in grpo-fast it is online.beta"),
    ({"num_generations": 16}, "in grpo-fast it is online.num_generations"),
    ({"temperature": 0.7}, "in grpo-fast it is online.temperature"),
    ({"loss_type": "grpo"}, "in grpo-fast it is online.loss_type"),
    ({"epsilon": 0.2}, "in grpo-fast it is online.epsilon_low (TRL's epsilon_high defaults to epsilon, "
                       "grpo-fast's to 0.2: set both)"),
    ({"online": {"epsilon": 0.2}},
     "unknown key 'online.epsilon' (TRL's name): in grpo-fast it is online.epsilon_low"),
    ({"bf16": True}, "in grpo-fast it is mixed_precision (TRL's default bf16 autocast over fp32 weights is "
                     "`mixed_precision: bf16` with `dtype: float32`"),
    ({"num_train_epochs": 3}, "in grpo-fast it is num_epochs"),
    ({"reward_weights": [1.0, 0.5]}, "in grpo-fast it is online.rewards (the weight of each entry)"),
    ({"scale_rewards": False},
     "in grpo-fast it is online.scale_rewards (TRL's true / false load as group / none)"),
    ({"warmup_steps": 0.1}, "in grpo-fast it is warmup_ratio"),
    ({"steps_per_generation": 4}, "not supported yet: one rollout batch per step"),
    ({"dataloader_num_workers": 2}, "not used: HF Trainer plumbing"),
    ({"online": {"learning_rate": 1e-6}}, "unknown key 'online.learning_rate' (TRL's name): in grpo-fast it is "
                                          "learning_rate"),
])
def test_specific_trl_names_get_specific_answers(data, message):
    assert message in error(data)


def test_a_trl_name_in_an_override_or_a_file_gets_the_same_answer(tmp_path):
    assert "unknown key 'max_completion_length' (TRL's name): in grpo-fast it is online.max_completion_length" in \
        error({}, ["max_completion_length=512"])
    path = tmp_path / "grpo.yaml"
    path.write_text("dataset_path: x\nper_device_train_batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"grpo\.yaml: unknown key 'per_device_train_batch_size' \(TRL's name\)"):
        load_config(path)


def test_a_name_that_is_not_trls_still_lists_the_allowed_keys():
    assert "unknown key 'online.num_generation'; allowed keys here: num_generations" in \
        error({"online": {"num_generation": 8}})


# ------------------------------------------------------------------------------------------
# README "Coming from TRL"
# ------------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float):
        text = f"{value:g}" if value == 0 or abs(value) >= 1e-3 else re.sub(r"\.?0*e", "e", f"{value:e}")
        return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", text)   # 1e-4, not 0.0001 or 1e-04
    return "{}" if value == {} else str(value)


def render_table() -> str:
    """The README table from TRL_FIELDS: a row for each field with a grpo-fast key, one for each
    reason shared by the fields without one. Keys named as TRL's show both defaults; a renamed
    key's note says what matters about its default."""
    theirs, ours = trl_defaults(), Config()
    rows = ["| TRL `GRPOConfig` field | grpo-fast key | default (TRL → grpo-fast) | notes |",
            "| --- | --- | --- | --- |"]
    reasons: dict[str, list[str]] = {}
    for field, (target, note) in TRL_FIELDS.items():
        if target is None:
            reasons.setdefault(note, []).append(field)
            continue
        default = ""
        if target.rsplit(".", 1)[-1] == field:
            trl_value, mine = _fmt(theirs[field]), _fmt(lookup(ours, target))
            default = f"`{mine}`" if trl_value == mine else f"`{trl_value}` → `{mine}`"
        rows.append(f"| `{field}` | `{target}` | {default} | {note} |")
    for note, fields in reasons.items():
        rows.append(f"| {', '.join(f'`{f}`' for f in fields)} | — | | {note} |")
    return "\n".join(rows) + "\n"


def readme_section() -> str:
    text = README.read_text()
    start = text.index("## Coming from TRL\n")
    end = text.index("## Configuration reference\n")
    assert start < end and "\n## " not in text[start + 3:end], "the section sits right before the reference"
    return text[start:end]


def test_readme_section_names_every_grpo_config_field():
    section = readme_section()
    missing = [f for f in trl_defaults() if f"`{f}`" not in section]
    assert not missing


def test_readme_table_is_the_config_table():
    assert render_table() in readme_section(), "regenerate it: python tests/test_config_trl.py"


def test_readme_error_examples_are_what_the_config_says(tmp_path):
    (block,) = re.findall(r"```text\n(.*?)```", readme_section(), flags=re.S)
    for line in block.splitlines():
        key = re.search(r"unknown key '(\w+)'", line).group(1)
        path = tmp_path / "grpo.yaml"
        path.write_text(f"dataset_path: x\n{key}: 1\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value).replace(str(path), "grpo.yaml").startswith(line.removesuffix(", ...)"))


def test_readme_yaml_example_loads():
    blocks = re.findall(r"```yaml\n(.*?)```", readme_section(), flags=re.S)
    assert blocks
    for block in blocks:
        cfg = config_from_dict(yaml.safe_load(block))
        assert cfg.mode == "online"


if __name__ == "__main__":
    sys.stdout.write(render_table())
