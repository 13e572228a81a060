"""The VRAM planner per GPU under several processes (grpo_fast.plan.parallel): one process is the
plain plan under any strategy, ZeRO-2 and FSDP2 halve full fine-tuning's optimizer states and
gradients on two GPUs, FSDP2's shards are the ones torch's fully_shard makes (two gloo ranks on
CPU), DDP adds its gradient buckets, and the CLI flags and their errors.

    pytest tests/test_plan_distributed.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_fast.cli import main
from grpo_fast.config import ConfigError, config_from_dict
from grpo_fast.plan import GiB, estimate, fit_search, fsdp_weight_bytes, model_shape, parallelism
from grpo_fast.plan.params import layer_tensors, root_tensors

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = REPO / "configs" / "accelerate"
TINY = str(REPO / "configs" / "models" / "tiny-llama.json")


def cfg_of(**overrides):
    """Qwen2.5-1.5B online, full fine-tuning in bf16 unless overridden."""
    data = {"mode": "online", "model_path": "Qwen/Qwen2.5-1.5B-Instruct", "batch_size": 1,
            "gradient_checkpointing": True, "optim": "adamw_torch", "lora": {"enabled": False},
            "online": {"dataset_name": "openai/gsm8k", "num_generations": 4, "max_prompt_length": 128,
                       "max_completion_length": 128}}
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and key in data else value
    return config_from_dict(data)


def plan_of(cfg, strategy_file=None, n=None, **kw):
    par = parallelism(str(ACCELERATE / f"{strategy_file}.yaml") if strategy_file else None, n)
    if cfg.mode == "offline":
        kw.setdefault("group_size", 4)
    return estimate(cfg, model_shape(cfg.model_path), parallel=par, **kw)


@pytest.mark.parametrize("name", ["ddp", "fsdp2", "zero2", "zero3"])
def test_one_process_under_any_strategy_is_the_plain_plan(name):
    for cfg in (cfg_of(), cfg_of(lora={"enabled": True}, quantization={"load_in_4bit": True}, optim="paged_adamw_8bit")):
        assert plan_of(cfg, name, 1) == plan_of(cfg)


def test_two_gpus_halve_full_fine_tuning_state_under_zero2_and_fsdp2():
    bf16, fp32 = cfg_of(), cfg_of(dtype="float32")
    shape = model_shape(bf16.model_path)
    # Per-tensor rounding bound: at most one extra row per tensor, per state and gradient.
    rows = [t for t in layer_tensors(bf16, shape) * shape.num_layers + root_tensors(bf16, shape)]
    for cfg in (bf16, fp32):
        ddp = plan_of(cfg, "ddp", 2)
        fsdp = plan_of(cfg, "fsdp2", 2)
        w = 4 if cfg is fp32 else 2
        slack = sum(t.cols for t in rows) * w * 3
        half = (ddp.optimizer_states + ddp.gradients) / 2
        assert half <= fsdp.optimizer_states + fsdp.gradients <= half + slack
        assert ddp.weights / 2 <= fsdp.weights <= ddp.weights / 2 + slack
        # DDP replicates everything and adds its flat gradient buckets.
        assert ddp.ddp_buckets == ddp.gradients and ddp.total == plan_of(cfg).total + ddp.gradients
    # ZeRO keeps AdamW's states on an fp32 master partition: halved exactly against DDP's fp32 ones,
    # the weights replicated.
    fp32 = cfg_of(dtype="float32")
    ddp, zero2 = plan_of(fp32, "ddp", 2), plan_of(fp32, "zero2", 2)
    assert zero2.optimizer_states + zero2.gradients == pytest.approx((ddp.optimizer_states + ddp.gradients) / 2, abs=12)
    assert zero2.weights == ddp.weights and zero2.master_weights == pytest.approx(ddp.weights / 2, abs=4)
    assert zero2.reduce_buffer == 500_000_000 * 4
    zero3 = plan_of(fp32, "zero3", 2)
    assert zero3.weights < 0.51 * ddp.weights and zero3.gathered_weights > 0


FSDP_SCRIPT = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

dist.init_process_group("gloo")
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**json.load(open(sys.argv[1])))).to(torch.bfloat16)
for layer in model.model.layers:   # TRANSFORMER_BASED_WRAP: one unit per decoder layer, then the root
    fully_shard(layer)
fully_shard(model)
params = list(model.parameters())
out = {"local": sum(p.to_local().numel() * p.element_size() for p in params),
       "storage": sum(p.to_local().untyped_storage().nbytes() for p in params)}
model(input_ids=torch.randint(0, 259, (2, 8))).logits.float().sum().backward()
optimizer = torch.optim.AdamW(params, lr=1e-3)
optimizer.step()
out["grads"] = sum(p.grad.to_local().numel() * p.grad.element_size() for p in params)
out["states"] = sum(t.to_local().numel() * t.element_size() for s in optimizer.state.values()
                    for k, t in s.items() if k != "step")
print("RESULT", dist.get_rank(), json.dumps(out), flush=True)
dist.destroy_process_group()
"""


def test_fsdp2_shards_are_the_ones_fully_shard_makes(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # --standalone: torchrun picks a free port for its rendezvous.
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), TINY], capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = {int(r): json.loads(o) for _, r, o in (line.split(" ", 2) for line in run.stdout.splitlines()
                                                       if line.startswith("RESULT"))}
    cfg = config_from_dict({"mode": "online", "model_path": TINY, "optim": "adamw_torch", "lora": {"enabled": False},
                            "online": {"dataset_name": "x", "num_generations": 2, "max_prompt_length": 8,
                                       "max_completion_length": 8}})
    shape = model_shape(TINY)
    plan = estimate(cfg, shape, parallel=parallelism(str(ACCELERATE / "fsdp2.yaml"), 2))
    # vocab 259 splits 130 / 129 rows: the ranks' shards differ, their padded storage does not.
    assert measured[1]["local"] < measured[0]["local"]
    for rank in (0, 1):
        assert measured[rank]["local"] == fsdp_weight_bytes(cfg, shape, 2, rank)
        assert measured[rank]["storage"] == plan.weights
    # The per-GPU figures are rank 0's, the largest: gradients and AdamW's bf16 states as measured.
    assert measured[0]["grads"] == plan.gradients and measured[0]["states"] == plan.optimizer_states


def test_gathered_weights_follow_reshard_after_forward(tmp_path):
    cfg = cfg_of()
    resharded = plan_of(cfg, "fsdp2", 4)
    text = (ACCELERATE / "fsdp2.yaml").read_text().replace("fsdp_reshard_after_forward: true",
                                                           "fsdp_reshard_after_forward: false")
    (tmp_path / "keep.yaml").write_text(text)
    kept = estimate(cfg, model_shape(cfg.model_path), parallel=parallelism(str(tmp_path / "keep.yaml"), 4))
    layer = sum(t.nbytes for t in layer_tensors(cfg, model_shape(cfg.model_path)))
    assert kept.gathered_weights - resharded.gathered_weights == (28 - 2) * layer


def test_refusals_are_one_line_config_errors():
    qlora = cfg_of(lora={"enabled": True}, quantization={"load_in_4bit": True})
    with pytest.raises(ConfigError, match="load_in_4bit: a bitsandbytes base cannot be sharded by FSDP2") as e:
        plan_of(qlora, "fsdp2", 2)
    assert "\n" not in str(e.value)
    offline_qlora = cfg_of(lora={"enabled": True}, quantization={"load_in_4bit": True}, mode="offline",
                           dataset_path="data/x.jsonl")
    assert plan_of(offline_qlora, "zero2", 2).weights == plan_of(offline_qlora).weights
    with pytest.raises(ConfigError, match="load_in_4bit: ZeRO-3 partitions every weight"):
        plan_of(offline_qlora, "zero3", 2)
    colocated = cfg_of(online={"generation_backend": "vllm"})
    with pytest.raises(ConfigError, match="colocated vLLM engine is refused .* 2 processes"):
        plan_of(colocated, "ddp", 2, card=80 * GiB)
    # A vLLM server runs on other GPUs: the trainer's carry neither the engine nor a rollout.
    served = cfg_of(online={"generation_backend": "vllm", "vllm_mode": "server"})
    plan = plan_of(served, "ddp", 2)
    assert plan.engine is None and plan.generation == 0 and plan.ddp_buckets > 0


def test_fit_search_fits_each_gpu():
    cfg = cfg_of()
    card = 24 * GiB
    shape = model_shape(cfg.model_path)
    plain = fit_search(cfg, shape, card)["batch_size"]
    sharded = fit_search(cfg, shape, card, parallel=parallelism(str(ACCELERATE / "fsdp2.yaml"), 4))["batch_size"]
    replicated = fit_search(cfg, shape, card, parallel=parallelism(None, 2))["batch_size"]
    assert replicated < plain < sharded
    cfg = cfg_of(batch_size=sharded)
    assert plan_of(cfg, "fsdp2", 4).fits(card) and not plan_of(cfg_of(batch_size=sharded + 1), "fsdp2", 4).fits(card)


def test_cli_flags_change_the_printed_plan(capsys):
    args = ["plan", "--config", str(REPO / "configs" / "qwen2.5-1.5b-gsm8k-qlora.yaml"), "--gpu-memory", "24GiB",
            "--set", "lora.enabled=false", "--set", "quantization.load_in_4bit=false", "--set", "optim=adamw_torch"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--num-processes", "2"]) == 0
    ddp = capsys.readouterr().out
    assert main(args + ["--accelerate-config", str(ACCELERATE / "fsdp2.yaml"), "--num-processes", "4"]) == 0
    fsdp = capsys.readouterr().out
    assert "per GPU" not in plain and "DDP on 2 processes" in ddp and "DDP gradient buckets" in ddp
    assert "FSDP2 on 4 processes" in fsdp and "base weights (1/4 shard)" in fsdp and "gathered full weights" in fsdp

    def peak(text):
        return float(next(line for line in text.splitlines() if line.strip().startswith("peak =")).split()[-1])
    assert peak(fsdp) < peak(plain) < peak(ddp)
    assert main(args + ["--accelerate-config", str(ACCELERATE / "zero2.yaml")]) == 0
    assert "DeepSpeed ZeRO-2 on 2 processes" in capsys.readouterr().out
    assert main(["plan", "--config", str(REPO / "configs" / "tiny-offline.yaml"),
                 "--accelerate-config", str(ACCELERATE / "zero3.yaml")]) == 0
    assert "DeepSpeed ZeRO-3 on 2 processes" in capsys.readouterr().out


@pytest.mark.parametrize("text, key", [
    ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\nnum_processes: 2\n", "fsdp_config.fsdp_version"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 1\n", "deepspeed_config.zero_stage"),
    ("distributed_type: TPU\n", "distributed_type"),
    ("distributed_type: MULTI_GPU\nnum_processes: 0\n", "num_processes"),
    ("distributed_type: MULTI_GPU\nmixed_precision: bf16\n", "mixed_precision"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: cpu\n",
     "deepspeed_config.offload_optimizer_device"),
])
def test_bad_accelerate_files_exit_2_with_one_line(tmp_path, capsys, text, key):
    path = tmp_path / "acc.yaml"
    path.write_text(text)
    assert main(["plan", "--config", str(REPO / "configs" / "tiny-online.yaml"),
                 "--accelerate-config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and f"{key}:" in err


def test_bad_process_counts_exit_2(tmp_path, capsys):
    base = ["plan", "--config", str(REPO / "configs" / "tiny-online.yaml")]
    assert main(base + ["--num-processes", "0"]) == 2
    assert "--num-processes" in capsys.readouterr().err
    assert main(base + ["--accelerate-config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_a_gathered_fsdp2_rollout_holds_the_whole_policy():
    gathered, sharded = cfg_of(), cfg_of(online={"ds3_gather_for_generation": False})
    shape = model_shape(gathered.model_path)
    whole = plan_of(gathered, "fsdp2", 4)
    assert plan_of(sharded, "fsdp2", 4).rollout_gathered == 0
    # The rollout's gathered copy and the training phase's (root + 2 layers) make the whole policy.
    full = sum(t.nbytes for t in layer_tensors(gathered, shape)) * shape.num_layers + \
        sum(t.nbytes for t in root_tensors(gathered, shape))
    assert whole.rollout_gathered + whole.gathered_weights == full
    assert whole.generation == plan_of(sharded, "fsdp2", 4).generation + whole.rollout_gathered
