"""The `grpo-fast plan` report: the setup the config implies, the memory breakdown in GiB (with
generation_backend vllm, the colocated engine's section in place of the trainer's rollout), the
total against the card and the fit search.

    grpo-fast plan --config configs/qwen2.5-1.5b-gsm8k-qlora.yaml --gpu-memory 12GiB

    from grpo_fast.plan import plan_command
    print(plan_command(cfg, "12GiB"))
"""

from __future__ import annotations

from typing import Optional

from ..config import Config, ConfigError
from .engine import EnginePlan
from .formulas import GiB, MemoryPlan, estimate
from .fit import fit_search, parse_memory
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


def plan_command(cfg: Config, gpu_memory: Optional[str] = None) -> str:
    """The `grpo-fast plan` report: setup, breakdown table in GiB, total vs the card (from
    `gpu_memory`, else the local CUDA device, else none) and the fit search."""
    budget, card_name = _card(gpu_memory)
    shape = model_shape(cfg.model_path)
    group_size = offline_group_size(cfg) if cfg.mode == "offline" else None
    plan = estimate(cfg, shape, group_size=group_size, card=budget)
    engine = plan.engine
    p = precision(cfg)
    work = workload(cfg, group_size)
    attn, attn_reason = planned_attention(cfg)
    dtype_name = {4: "fp32", 2: "bf16" if planned_dtype(cfg) != "float16" else "fp16"}

    lines = [f"VRAM plan for {cfg.model_path} ({cfg.mode} GRPO)"]
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
    lines += [f"  {k:<10} {v}" for k, v in setup]

    width = 52
    rows: list[tuple[str, Optional[float], str]] = [("resident", None, "")]
    rows.append(("  base weights", plan.weights, ""))
    if plan.reference_weights:
        rows.append(("  reference model copy (beta > 0)", plan.reference_weights, ""))
    if cfg.lora.enabled:
        rows.append(("  LoRA parameters", plan.lora_params, ""))
    rows.append((f"  optimizer states ({cfg.optim})", plan.optimizer_states, ""))
    if plan.dequant_buffer:
        rows.append(("  dequantization buffer", plan.dequant_buffer, ""))
    rows.append(("  CUDA context + allocator", plan.cuda_overhead, ""))
    if work.generates and engine is None:
        rows += [("rollout (generate, no grad)", None, ""),
                 (f"  KV cache, {work.sequences} x {work.seq_len} tokens", plan.kv_cache, ""),
                 ("  prefill / sampling workspace", plan.generation_workspace, "")]
    if plan.scoring:
        rows += [("reference / old log-probs (no grad)", None, ""),
                 ("  forward workspace + log-probs", plan.scoring, "")]
    other_activations = plan.activations_full if cfg.gradient_checkpointing else plan.activations_checkpointed
    other_label = "without" if cfg.gradient_checkpointing else "with"
    rows += [("training step (forward + backward)", None, ""),
             (f"  activations{', checkpointed' if cfg.gradient_checkpointing else ''}", plan.activations,
              f"{other_label} checkpointing: {other_activations / GiB:.2f}"),
             ("  backward workspace", plan.backward_workspace, ""),
             ("  gradients", plan.gradients, ""),
             (f"  log-prob step ({_KERNEL_LABELS[cfg.logprob_backend]})", plan.logprob_step,
              f"full logits would need {plan.full_logits / GiB:.2f}")]
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
    found = fit_search(cfg, shape, budget, group_size=group_size)
    column = max(32, *(len(key) + 2 for key in found))
    for key, value in found.items():
        shown = (f"{value:.2f}" if isinstance(value, float) else str(value)) if value else "none (not even 1)"
        lines.append(f"    {key:<{column}}{shown}")
    return "\n".join(lines)
