"""The `grpo-fast plan` report: the setup the config implies, the memory breakdown in GiB (with
generation_backend vllm, the colocated engine's section in place of the trainer's rollout), the
total against the card and the fit search; under several processes all of it per GPU, the
sharded components marked with their share.

    grpo-fast plan --config configs/qwen2.5-1.5b-gsm8k-qlora.yaml --gpu-memory 12GiB
    grpo-fast plan --config configs/tiny-online.yaml --accelerate-config configs/accelerate/fsdp2.yaml \
        --num-processes 4 --gpu-memory 12GiB

    from grpo_fast.plan import plan_command
    print(plan_command(cfg, "12GiB"))
    print(plan_command(cfg, "12GiB", accelerate_config="configs/accelerate/zero2.yaml", num_processes=4))
"""

from __future__ import annotations

from typing import Optional

from ..config import Config, ConfigError
from .engine import EnginePlan, serves_remotely
from .formulas import GiB, MemoryPlan, estimate
from .fit import fit_search, parse_memory
from .parallel import REDUCE_BUCKET_SIZE, Parallelism, parallelism
from .shapes import model_shape
from .inputs import lora_param_count, lora_targets, planned_attention, planned_dtype, precision, workload

_KERNEL_LABELS = {"auto": "fused Triton kernel", "triton": "fused Triton kernel",
                  "chunked": "chunked kernel", "naive": "naive: full logits"}


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def offline_group_size(cfg: Config) -> int:
    """The largest number of completions per group in cfg.dataset_path (offline plans)."""
    from ..data import DataError, iter_json_entries

    if cfg.dataset_path is None:
        raise ConfigError("dataset_path: an offline plan reads the group size from it")
    try:
        sizes = []
        for line, record, problem in iter_json_entries(cfg.dataset_path):
            if problem is not None and not cfg.skip_invalid:
                raise DataError(f"{cfg.dataset_path}:{line}: {problem}")
            if isinstance(record, dict):
                sizes.append(len(record.get("completions") or []))
    except DataError as e:
        raise ConfigError(f"dataset_path: {e}") from None
    if not sizes or max(sizes) < 1:
        raise ConfigError(f"dataset_path: {cfg.dataset_path} holds no completions to size groups from")
    return max(sizes)


def _card(gpu_memory: Optional[str]) -> tuple[Optional[int], str]:
    if gpu_memory is not None:
        return parse_memory(gpu_memory), gpu_memory.strip()
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, props.name
    return None, ""


def _quant_label(cfg: Config) -> str:
    q = cfg.quantization
    if q.load_in_4bit:
        return f"{q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"
    if q.load_in_8bit:
        return "int8 (LLM.int8)"
    return planned_dtype(cfg)


def _engine_rows(cfg: Config, engine: EnginePlan, dtype: str) -> list[tuple[str, Optional[float], str]]:
    """The table's engine section: what vLLM holds, the KV cache it leaves and what it takes."""
    tp = f"; tensor parallel {engine.tensor_parallel}, per GPU" if engine.tensor_parallel > 1 else ""
    base = ("the dequantized 4-bit base" if cfg.quantization.load_in_4bit else
            "the base" if cfg.lora.enabled else "the full model")
    rows: list[tuple[str, Optional[float], str]] = [
        (f"engine (vLLM, colocated; sleep mode {'on' if engine.sleep_mode else 'off'}{tp})", None, ""),
        (f"  weights ({dtype}, {base})", engine.weights, "")]
    if engine.lora_slot:
        rows.append((f"  LoRA slot (r={engine.lora_rank}, {dtype})", engine.lora_slot, ""))
    rows += [(f"  profiled workspace ({engine.batched_tokens} tokens, {engine.max_num_seqs} rows)",
              engine.workspace, ""),
             ("  non-torch + CUDA graphs (kept asleep)", engine.fixed, "")]
    need = f"a micro-batch needs {engine.kv_needed / GiB:.2f}"
    if engine.total is None:
        rows += [("  KV cache: the rest", None, f"{need} of it"),
                 (f"  total = {engine.utilization:g} x card", None, "pass --gpu-memory for its size")]
        return rows
    if not engine.starts:
        holds = "vLLM cannot start"
    elif engine.waves == 1:
        holds = f"all {engine.sequences} sequences at once"
    else:
        holds = f"{engine.at_once} of {engine.sequences} sequences at once: ~{engine.waves} waves"
    rows += [("  KV cache: the rest", max(0, engine.kv_cache), f"{need}: {holds}"),
             (f"  total = {engine.utilization:g} x card", engine.total, "")]
    return rows


def _trainer_label(plan: MemoryPlan) -> str:
    phases = {"rollout": plan.generation, "scoring": plan.scoring, "training": plan.training}
    return f"resident + {max(phases, key=phases.get)}"


def _peak_label(plan: MemoryPlan) -> str:
    phase = _trainer_label(plan).removeprefix("resident + ")
    engine = plan.engine
    if engine is None:
        return f"peak = resident + {phase}"
    if not engine.sleep_mode:
        return f"peak = resident + {phase} + engine"
    if plan.trainer + engine.asleep >= plan.resident + engine.total:
        return f"peak = resident + {phase} + sleeping engine"
    return "peak = resident + engine (rollout)"


def _engine_notes(engine: EnginePlan) -> list[str]:
    """Sleep mode, and the engine sizes that start vLLM and hold a micro-batch at once."""
    if engine.sleep_mode:
        weights = (f"offloads its {engine.offloaded / GiB:.2f} GiB of weights to CPU RAM" if engine.sleep_level == 1
                   else "drops its weights (pushed anew on waking)")
        lines = [f"  sleep mode: while the trainer trains, the engine {weights}",
                 f"  and frees its KV cache, keeping {engine.asleep / GiB:.2f} GiB: the peak is the larger phase"]
    else:
        lines = ["  sleep mode off: the engine keeps its whole total through training; with",
                 f"  online.vllm_enable_sleep_mode: true it keeps {engine.fixed / GiB:.2f} GiB, the peak being the larger phase"]
    if engine.total is None:
        lines.append(f"  the engine needs {engine.start_total / GiB:.2f} GiB to start, "
                     f"{engine.one_wave_total / GiB:.2f} GiB to decode a micro-batch at once")
    else:
        lines.append(f"  vllm_gpu_memory_utilization {engine.utilization:g}: vLLM starts from "
                     f"{engine.utilization_for(engine.start_total):.2f}, decodes a micro-batch at once from "
                     f"{engine.utilization_for(engine.one_wave_total):.2f}")
    problem = engine.problem()
    return lines + ([f"  {problem}"] if problem else [])


def _parallel_setup(par: Parallelism) -> str:
    n = par.num_processes
    if n == 1:
        return f"{par.label} on 1 process (from {par.source}): nothing to shard, the one-process plan"
    shares = {"ddp": "everything replicated, plus DDP's gradient buckets",
              "zero2": f"optimizer states and gradients 1/{n}, weights replicated",
              "fsdp2": f"weights, gradients, optimizer states 1/{n}, per tensor along dim 0",
              "zero3": f"weights, gradients, optimizer states 1/{n}, per parameter"}
    return f"{par.label} on {n} processes (from {par.source}), per GPU: {shares[par.strategy]}"


def _share(plan: MemoryPlan, trainable: bool) -> str:
    """'1/N shard' (or partition) for what the launch splits: weights under FSDP2 / ZeRO-3,
    trainable state under either and ZeRO-2; '' for the rest."""
    par = plan.parallel
    if par is None or par.num_processes == 1 or par.strategy == "ddp" or (not trainable and par.strategy == "zero2"):
        return ""
    return f"1/{par.num_processes} {'shard' if par.strategy == 'fsdp2' else 'partition'}"


def _noted(label: str, *notes: str) -> str:
    """`label (note, note)` with the non-empty notes, or the label alone."""
    shown = [n for n in notes if n]
    return f"{label} ({', '.join(shown)})" if shown else label


def _resident_rows(cfg: Config, plan: MemoryPlan) -> list[tuple[str, Optional[float], str]]:
    """The resident section; under several processes each split part says its share."""
    par = plan.parallel
    weights = _share(plan, trainable=False)
    rows: list[tuple[str, Optional[float], str]] = [("resident", None, "")]
    rows.append((_noted("  base weights", weights), plan.weights, ""))
    if plan.reference_weights:
        rows.append((_noted("  reference model copy", "beta > 0", weights), plan.reference_weights, ""))
    if cfg.lora.enabled:
        rows.append((_noted("  LoRA parameters", weights), plan.lora_params, ""))
    # ZeRO's AdamW works on its fp32 master partition (an 8-bit optimizer keeps its own dtype).
    fp32 = "fp32" if par and par.strategy.startswith("zero") and cfg.optim == "adamw_torch" else ""
    rows.append((_noted("  optimizer states", cfg.optim, fp32, _share(plan, trainable=True)), plan.optimizer_states, ""))
    if plan.master_weights:
        rows.append((f"  fp32 master weights (1/{par.num_processes} partition)", plan.master_weights, ""))
    if plan.ddp_buckets:
        rows.append(("  DDP gradient buckets (flat copy of the gradients)", plan.ddp_buckets, ""))
    if plan.gathered_weights:
        what = ("root + 2 layers" if par.strategy == "fsdp2" and par.reshard_after_forward else
                "root + every layer" if par.strategy == "fsdp2" else "root + layer + prefetch")
        rows.append((f"  gathered full weights ({what})", plan.gathered_weights, ""))
    if plan.dequant_buffer:
        rows.append(("  dequantization buffer", plan.dequant_buffer, ""))
    rows.append(("  CUDA context + allocator", plan.cuda_overhead, ""))
    return rows


def plan_command(cfg: Config, gpu_memory: Optional[str] = None, accelerate_config: Optional[str] = None,
                 num_processes: Optional[int] = None) -> str:
    """The `grpo-fast plan` report: setup, breakdown table in GiB, total vs the card (from
    `gpu_memory`, else the local CUDA device, else none) and the fit search; per GPU of the
    launch `accelerate_config` / `num_processes` describe (grpo_fast.plan.parallel)."""
    par = parallelism(accelerate_config, num_processes)
    budget, card_name = _card(gpu_memory)
    shape = model_shape(cfg.model_path)
    group_size = offline_group_size(cfg) if cfg.mode == "offline" else None
    plan = estimate(cfg, shape, group_size=group_size, card=budget, parallel=par)
    engine = plan.engine
    p = precision(cfg)
    work = workload(cfg, group_size)
    attn, attn_reason = planned_attention(cfg)
    dtype_name = {4: "fp32", 2: "bf16" if planned_dtype(cfg) != "float16" else "fp16"}

    per_gpu = f", per GPU of {par.num_processes}" if par and par.num_processes > 1 else ""
    lines = [f"VRAM plan for {cfg.model_path} ({cfg.mode} GRPO){per_gpu}"]
    setup = [
        ("model", f"{_count(shape.num_params)} params: {shape.num_layers} layers, "
                  f"hidden {shape.hidden_size}, "
                  f"MLP {shape.intermediate_size}, {shape.num_heads} heads / {shape.num_kv_heads} KV, "
                  f"vocab {shape.vocab_size}{', tied' if shape.tie_word_embeddings else ''}"),
        ("", f"shape from {shape.source}"),
        ("weights", f"{_quant_label(cfg)}; embeddings, LM head, norms {dtype_name[p.weight]}; "
                    f"activations {dtype_name[p.stream]}"),
    ]
    if cfg.lora.enabled:
        targets = lora_targets(cfg)
        setup.append(("LoRA", f"r={cfg.lora.r} on {','.join(t.replace('_proj', '') for t in targets)}: "
                              f"{_count(lora_param_count(cfg, shape))} params; optim {cfg.optim}"))
    else:
        setup.append(("training", f"full fine-tuning; optim {cfg.optim}"))
    if work.generates:
        prompts = f"{cfg.batch_size} prompt{'s' if cfg.batch_size != 1 else ''}"
        setup.append(("batch", f"{prompts} x G={cfg.online.num_generations} = {work.sequences} "
                               f"sequences of {work.prompt_tokens} + {work.completion_tokens} tokens"))
    else:
        setup.append(("batch", f"{cfg.batch_size} groups x {group_size} completions = {work.sequences} "
                               f"sequences of {work.seq_len} tokens"))
    setup.append(("attention", f"{attn} ({attn_reason}); gradient checkpointing "
                               f"{'on' if cfg.gradient_checkpointing else 'off'}"))
    if par is not None:
        setup.append(("parallel", _parallel_setup(par)))
    lines += [f"  {k:<10} {v}" for k, v in setup]

    width = 52
    rows = _resident_rows(cfg, plan)
    if serves_remotely(cfg):
        rows.append(("rollout: vLLM server on other GPUs (vllm_mode server)", None, ""))
    elif work.generates and engine is None:
        rows += [("rollout (generate, no grad)", None, ""),
                 (f"  KV cache, {work.sequences} x {work.seq_len} tokens", plan.kv_cache, ""),
                 ("  prefill / sampling workspace", plan.generation_workspace, "")]
        if plan.rollout_gathered:
            rows.append(("  the policy gathered whole (ds3_gather...)", plan.rollout_gathered, ""))
    if plan.scoring:
        rows += [("reference / old log-probs (no grad)", None, ""),
                 ("  forward workspace + log-probs", plan.scoring, "")]
    other_activations = plan.activations_full if cfg.gradient_checkpointing else plan.activations_checkpointed
    other_label = "without" if cfg.gradient_checkpointing else "with"
    rows += [("training step (forward + backward)", None, ""),
             (f"  activations{', checkpointed' if cfg.gradient_checkpointing else ''}", plan.activations,
              f"{other_label} checkpointing: {other_activations / GiB:.2f}"),
             ("  backward workspace", plan.backward_workspace, ""),
             (_noted("  gradients", _share(plan, trainable=True)), plan.gradients, "")]
    if plan.reduce_buffer:
        transient = ("a layer's full gradient" if plan.parallel.strategy == "fsdp2" else
                     f"reduce bucket, {REDUCE_BUCKET_SIZE:.0e} elements")
        rows.append((f"  reduce transient ({transient})", plan.reduce_buffer, ""))
    rows.append((f"  log-prob step ({_KERNEL_LABELS[cfg.logprob_backend]})", plan.logprob_step,
                 f"full logits would need {plan.full_logits / GiB:.2f}"))
    if engine is not None:
        rows += _engine_rows(cfg, engine, dtype_name[p.weight])
    lines += ["", f"  {'component':<{width}}{'GiB':>8}", "  " + "-" * (width + 8)]
    for label, value, note in rows:
        text = f"  {label:<{width}}{_gib(value) if value is not None else '':>8}"
        lines.append(f"{text}   ({note})" if note else text.rstrip())
    lines.append("  " + "-" * (width + 8))
    if engine is not None and engine.total is None:
        share = f"{engine.utilization:g} x card"
        peak = (f"the larger of trainer + {engine.asleep / GiB:.2f} and resident + {share}" if engine.sleep_mode
                else f"trainer + {share}")
        lines += [f"  {'trainer = ' + _trainer_label(plan):<{width}}{_gib(plan.trainer)}",
                  f"  peak = {peak}: pass --gpu-memory for the total"]
    else:
        lines += [f"  {_peak_label(plan):<{width}}{_gib(plan.total)}",
                  f"  {'(as torch.cuda.max_memory_allocated sees it)':<{width}}{_gib(plan.allocated)}"]
    if plan.reduce_buffer:
        lines += ["  training = activations + gradients + the reduce transient + the larger of the",
                  "  backward workspace and the log-prob step (the latter is freed first in the backward)"]
    else:
        lines += ["  training = activations + gradients + the larger of the backward workspace and the",
                  "  log-prob step (the latter is freed first in the backward)"]
    if engine is not None:
        lines += _engine_notes(engine)
    if budget is None:
        lines += ["", "  no card to compare with: pass --gpu-memory (e.g. --gpu-memory 12GiB)"]
        return "\n".join(lines)
    headroom = budget - plan.total
    if not plan.fits(budget) and headroom >= 0:
        verdict = "does NOT fit: vLLM cannot start (above)"
    else:
        verdict = f"fits, {headroom / GiB:.2f} GiB to spare" if headroom >= 0 else \
            f"does NOT fit: {-headroom / GiB:.2f} GiB over"
    lines += ["", f"  card {card_name} ({budget / GiB:.2f} GiB): {verdict}",
              "  largest that fit, each with the others as configured:"]
    found = fit_search(cfg, shape, budget, group_size=group_size, parallel=par)
    column = max(32, *(len(key) + 2 for key in found))
    for key, value in found.items():
        shown = (f"{value:.2f}" if isinstance(value, float) else str(value)) if value else "none (not even 1)"
        lines.append(f"    {key:<{column}}{shown}")
    return "\n".join(lines)
