"""Held-out evaluation of a model or adapter.

    grpo-fast eval --config configs/tiny-offline.yaml --adapter outputs/tiny-offline

Offline (scored groups): pairwise ranking accuracy (fraction of within-group completion pairs
with different scores that the model's sequence log-probs order like the scores), top-1 score
(mean score of the completion with the highest sequence log-prob) and mean KL(q || p). With an
adapter, the base model (adapter disabled) is evaluated too, so the gain is visible in one table.
Online configs: greedy decoding on a prompt/answer file, scored by the configured reward
functions (`evaluate_online`; the online trainer's periodic eval is the same `greedy_eval`).
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch

from . import logprobs
from .config import Config, ConfigError
from .data import GroupCollator, load_offline_dataset, prompt_records, reward_inputs
from .listwise import listwise_metrics
from .modeling import load_model_and_tokenizer
from .preflight import check_input_file, check_sources, load_rewards
from .rewards import RewardFunction, compute_rewards, reward_columns, reward_metrics
from .rollout import RolloutBackend, completion_metrics, eos_token_ids, make_backend

logger = logging.getLogger(__name__)


@torch.no_grad()
def offline_seq_logps(cfg: Config, model, dataset, batch_size: int) -> tuple[torch.Tensor, ...]:
    """(N, K) sequence log-probs, scores and group mask over a tokenized scored dataset."""
    collate = GroupCollator(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
    device = next(model.parameters()).device
    K = max(len(r) for r in dataset["scores"])
    all_logps, all_scores, all_masks = [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        seq = logprobs.group_logprobs(model, batch, normalize=cfg.offline.length_normalize,
                                      backend=cfg.logprob_backend,
                                      shared_prompt=cfg.offline.shared_prompt)  # (B, k)
        pad = K - seq.shape[1]                                             # groups differ in size
        all_logps.append(torch.nn.functional.pad(seq.float(), (0, pad)).cpu())
        all_scores.append(torch.nn.functional.pad(batch["scores"], (0, pad)).cpu())
        all_masks.append(torch.nn.functional.pad(batch["group_mask"], (0, pad)).cpu())
    return torch.cat(all_logps), torch.cat(all_scores), torch.cat(all_masks)


def offline_metrics(cfg: Config, model, dataset, batch_size: int) -> dict[str, float]:
    seq, scores, mask = offline_seq_logps(cfg, model, dataset, batch_size)
    m = listwise_metrics(seq, scores, mask, policy_temperature=cfg.offline.policy_temperature,
                         score_temperature=cfg.offline.score_temperature)
    return {"pairwise_accuracy": m["pairwise_accuracy"], "top1_score": m["top1_score"],
            "kl": m["kl"], "entropy": m["entropy"], "groups": float(mask.shape[0])}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(rows.values())).keys())
    name_w = max(len("model"), *(len(n) for n in rows))
    header = "model".ljust(name_w) + "".join(f"  {k:>18}" for k in keys)
    lines = [header, "-" * len(header)]
    for name, vals in rows.items():
        lines.append(name.ljust(name_w) + "".join(f"  {vals[k]:>18.4f}" for k in keys))
    return "\n".join(lines)


def evaluate(cfg: Config, adapter: Optional[str] = None, data_path: Optional[str] = None,
             output: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Evaluate and print a table; writes the results as JSON to `output` (default:
    <adapter or output_dir>/eval_results.json). Returns {model name: metrics}."""
    if data_path is None and cfg.eval_dataset_path is None:
        raise ConfigError("eval_dataset_path: not set (or pass --data FILE)")
    # Every path is checked before any model loads.
    if data_path:
        check_input_file(data_path, "--data")
    else:
        check_input_file(cfg.eval_dataset_path, "eval_dataset_path")
    check_sources(cfg, adapter=adapter)
    data_path = data_path or cfg.eval_dataset_path
    if cfg.mode == "online":
        results = evaluate_online(cfg, adapter=adapter, data_path=data_path)
    else:
        model, tokenizer = load_model_and_tokenizer(cfg, adapter_path=adapter, trainable=False)
        dataset = load_offline_dataset(data_path, tokenizer, cfg.max_seq_length, cfg.skip_invalid,
                                    score_temperature=cfg.offline.score_temperature)
        results = {}
        if adapter is not None or cfg.lora_path is not None:
            ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
            with ctx:
                results["base (adapter off)"] = offline_metrics(cfg, model, dataset, cfg.batch_size)
        results[adapter or cfg.lora_path or cfg.model_path] = offline_metrics(cfg, model, dataset, cfg.batch_size)
    print(f"eval on {data_path}")
    print(format_table(results))
    out_path = Path(output) if output else Path(adapter or cfg.output_dir) / "eval_results.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"data": data_path, "results": results}, indent=2))
    print(f"wrote {out_path}")
    return results


@torch.no_grad()
def greedy_eval(backend: RolloutBackend, reward_fns: list[RewardFunction], records: list[dict]) -> dict[str, float]:
    """Completions of `records` from `backend`, scored by the reward functions: one greedy
    completion per prompt, or with `online.num_generations_eval: n`, n sampled with the training
    settings (every metric then averages over all n x prompts completions).

    Returns `accuracy` (mean of the first reward function, None ignored: the accuracy for 0/1
    rewards such as math_answer or exact_match), `reward` (mean weighted total),
    `rewards/<name>/mean` per function, `completions/mean_length` and `completions/clipped_ratio`."""
    n = backend.cfg.online.num_generations_eval
    # One batch: a decode step costs about the same for 200 rows as for 64 on a small model, and
    # its KV cache is that of eval_max_samples rows (lower it if that does not fit).
    prompts = [r["prompt"] for r in records]
    roll = backend.generate(prompts, num_generations=n) if n else backend.generate(prompts, greedy=True)
    G = n or 1
    columns = reward_columns(records, roll.completion_token_lists(), roll.terminated.tolist(), G)
    prompts, completions = reward_inputs(records, roll.texts, G)
    per_fn, total = compute_rewards(reward_fns, prompts, completions, columns)           # (N*G, F), (N*G,)
    metrics = reward_metrics(per_fn, total, reward_fns)
    out = {"accuracy": metrics[f"rewards/{reward_fns[0].name}/mean"], "reward": metrics["reward"]}
    out.update({f"rewards/{r.name}/mean": metrics[f"rewards/{r.name}/mean"] for r in reward_fns})
    lengths = completion_metrics(roll.lengths.cpu(), roll.terminated.cpu())
    out.update({k: lengths[k] for k in ("completions/mean_length", "completions/clipped_ratio")})
    return out


def evaluate_online(cfg: Config, adapter: Optional[str] = None,
                    data_path: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Greedy held-out evaluation: {model name: metrics of `greedy_eval`} for the model (with
    `adapter` or cfg.lora_path if given) and, when an adapter is loaded, the base model with the
    adapter switched off, so the gain shows in one table."""
    data_path = data_path or cfg.eval_dataset_path
    if data_path is None:
        raise ConfigError("eval_dataset_path: not set (or pass --data FILE)")
    reward_fns = load_rewards(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg, adapter_path=adapter, trainable=False)
    backend = make_backend(cfg, model, tokenizer, eos_token_ids(model, tokenizer))
    records = prompt_records(cfg, tokenizer, data_path)[:cfg.online.eval_max_samples]
    results = {}
    try:
        if cfg.lora.enabled and (adapter or cfg.lora_path):
            with model.disable_adapter():
                results["base (adapter off)"] = greedy_eval(backend, reward_fns, records)
        results[adapter or cfg.lora_path or cfg.model_path] = greedy_eval(backend, reward_fns, records)
    finally:
        backend.close()
    return results
