"""Datasets: scored-completion groups (offline GRPO) and prompt sets (online GRPO).

Offline format, a JSON array or JSONL file, one record per prompt:

    {"prompt": "2+3=", "completions": [{"text": "5", "score": 1.0}, {"text": "7", "score": 0.2}]}

At least 2 completions per record; groups may differ in size K; every score finite and small
enough for the loss in float32 (see `validate_scored_record`). Each (prompt, completion) pair
is tokenized as prompt + completion + EOS; only completion tokens (and the EOS) are scored.
Bad records raise `DataError` naming the file and line (or are skipped and counted with
`skip_invalid`). A JSONL line is decoded (UTF-8) and parsed on its own, so one that is not
UTF-8 or not JSON is a bad record like the others; inside a JSON array such a defect is always
an error, as the records after it cannot be found.

Online format: JSON/JSONL with a `prompt` column (a string, or a list of chat messages rendered
with the tokenizer's chat template) plus any other columns (e.g. `answer`), which are handed to
the reward functions; or a `datasets` hub name + split. Prompt files have no `skip_invalid`:
any line that cannot be read is an error naming it.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from .listwise import MAX_SCALED_SCORE

if TYPE_CHECKING:
    from .config import Config

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message names the file and the line."""


def _not_utf8(data: bytes, err: UnicodeDecodeError) -> tuple[int, str]:
    """(1-based line within `data`, problem) for the first byte that is not valid UTF-8; the
    column counts characters, as an editor shows it."""
    line_start = data.rfind(b"\n", 0, err.start) + 1
    column = len(data[line_start:err.start].decode("utf-8")) + 1
    return (data.count(b"\n", 0, err.start) + 1,
            f"not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column})")


def _invalid_json(err: ValueError) -> str:
    # Besides JSONDecodeError, json raises a plain ValueError for an integer literal over
    # Python's digit limit.
    return f"invalid JSON: {err.msg if isinstance(err, json.JSONDecodeError) else err}"


def iter_json_entries(path: str) -> Iterator[tuple[int, Any, Optional[str]]]:
    """Yield (line_number, record, problem) from a JSON array or a JSONL file.

    Line numbers are 1-based and point at the line where the record starts, so an error message
    can send the user straight to it. `problem` is None, or for a JSONL line that is not valid
    UTF-8 or not valid JSON, what is wrong with it (the record is then None): each JSONL line is
    decoded on its own, so the caller may skip it and go on. In a JSON array the next record
    cannot be found past such a defect, so it raises DataError instead."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: file not found")
    data = p.read_bytes()
    if data.lstrip().startswith(b"["):
        yield from _iter_json_array(path, data)
        return
    # Split on b"\n" only: str.splitlines would also break at U+2028 and other separators that
    # are legal inside JSON strings.
    for line, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield line, None, _not_utf8(raw, e)[1]
            continue
        if not text.strip():
            continue
        try:
            yield line, json.loads(text), None
        except ValueError as e:
            yield line, None, _invalid_json(e)


def _iter_json_array(path: str, data: bytes) -> Iterator[tuple[int, Any, None]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, problem = _not_utf8(data, e)
        raise DataError(f"{path}:{line}: {problem}") from None
    decoder = json.JSONDecoder()
    idx = text.index("[") + 1
    while True:
        while idx < len(text) and text[idx] in " \t\r\n,":
            idx += 1
        if idx >= len(text):
            raise DataError(f"{path}: unterminated JSON array")
        if text[idx] == "]":
            return
        line = text.count("\n", 0, idx) + 1
        try:
            record, idx = decoder.raw_decode(text, idx)
        except ValueError as e:
            raise DataError(f"{path}:{line}: {_invalid_json(e)}") from None
        yield line, record, None


def iter_json_records(path: str) -> Iterator[tuple[int, Any]]:
    """Yield (line_number, record) from a JSON array or a JSONL file (see `iter_json_entries`);
    any line that cannot be read raises DataError naming the file and line."""
    for line, record, problem in iter_json_entries(path):
        if problem is not None:
            raise DataError(f"{path}:{line}: {problem}")
        yield line, record


def _score_problem(score: Any, score_temperature: float) -> Optional[str]:
    if isinstance(score, bool) or not isinstance(score, (int, float)) or (
            isinstance(score, float) and not math.isfinite(score)):
        return f"must be a finite number, got {score!r}"
    # An int compares with a float exactly, so a huge integer cannot overflow here.
    if abs(score) > MAX_SCALED_SCORE * min(1.0, score_temperature):
        return (f"{score!r:.32} is too large: |score| and |score| / score_temperature "
                f"({score_temperature:g}) must be at most {MAX_SCALED_SCORE:.4g} (float32 max / 4) "
                "for the loss to stay finite in float32")
    return None


def validate_scored_record(record: Any, *, score_temperature: float = 1.0) -> Optional[str]:
    """None if `record` is a valid scored group, else what is wrong with it.

    Scores are used in float32, divided by `score_temperature`, inside a log-softmax; so both
    |score| and |score| / score_temperature must be at most `MAX_SCALED_SCORE` (float32 max / 4),
    which keeps score differences and the loss and its gradient finite."""
    if not isinstance(record, dict):
        return f"record must be an object, got {type(record).__name__}"
    for key in ("prompt", "completions"):
        if key not in record:
            return f"missing key '{key}'"
    prompt = record["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        return "'prompt' must be a non-empty string"
    comps = record["completions"]
    if not isinstance(comps, list):
        return "'completions' must be a list"
    if len(comps) < 2:
        return f"'completions' needs at least 2 entries for a group, got {len(comps)}"
    for i, c in enumerate(comps):
        if not isinstance(c, dict):
            return f"completions[{i}] must be an object with 'text' and 'score'"
        for key in ("text", "score"):
            if key not in c:
                return f"completions[{i}]: missing key '{key}'"
        if not isinstance(c["text"], str):
            return f"completions[{i}].text must be a string"
        problem = _score_problem(c["score"], score_temperature)
        if problem is not None:
            return f"completions[{i}].score {problem}"
    return None


def load_scored_records(path: str, skip_invalid: bool = False, *,
                        score_temperature: float = 1.0) -> list[dict]:
    """Read and validate a scored-completion file; returns the valid records.

    With `skip_invalid`, invalid records and unreadable JSONL lines (not UTF-8, not JSON) are
    logged with file:line, counted and skipped; a defect inside a JSON array still raises."""
    records, skipped = [], 0
    for line, record, problem in iter_json_entries(path):
        problem = problem or validate_scored_record(record, score_temperature=score_temperature)
        if problem is None:
            records.append({"prompt": record["prompt"],
                            "texts": [c["text"] for c in record["completions"]],
                            "scores": [float(c["score"]) for c in record["completions"]]})
        elif skip_invalid:
            skipped += 1
            logger.warning("%s:%d: skipped invalid record: %s", path, line, problem)
        else:
            raise DataError(f"{path}:{line}: {problem} (set skip_invalid: true to skip such records)")
    if skipped:
        logger.warning("%s: skipped %d invalid record(s), kept %d", path, skipped, len(records))
    if not records:
        raise DataError(f"{path}: no valid records")
    return records


def tokenize_group(tokenizer, prompt: str, texts: list[str], max_seq_length: int) -> dict:
    """Token ids and completion masks of one group: prompt + completion + EOS each, truncated
    from the left to max_seq_length so the completion's end (and its EOS) is always kept."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    input_ids, completion_masks = [], []
    for text in texts:
        comp_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt_ids + comp_ids
        cmask = [0] * len(prompt_ids) + [1] * len(comp_ids)
        input_ids.append(ids[-max_seq_length:])
        completion_masks.append(cmask[-max_seq_length:])
    return {"input_ids": input_ids, "completion_mask": completion_masks}


def load_offline_dataset(path: str, tokenizer, max_seq_length: int, skip_invalid: bool = False, *,
                         score_temperature: float = 1.0):
    """A `datasets.Dataset` of tokenized groups with columns input_ids (K, T_k),
    completion_mask (K, T_k) and scores (K,); `score_temperature` is the loss's, which bounds
    the scores (see `validate_scored_record`)."""
    import datasets

    records = load_scored_records(path, skip_invalid, score_temperature=score_temperature)
    ds = datasets.Dataset.from_list(records)
    return ds.map(
        lambda r: {**tokenize_group(tokenizer, r["prompt"], r["texts"], max_seq_length),
                   "scores": r["scores"]},
        remove_columns=["texts"], desc="tokenizing groups")


@dataclass
class GroupCollator:
    """Pads a list of groups into (B, K, T) tensors plus a (B, K) group mask.

    K is the largest group in the batch and T the longest sequence: padding is right-sided and
    masked out of both attention and the completion mask."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        B = len(features)
        K = max(len(f["input_ids"]) for f in features)
        T = max(len(ids) for f in features for ids in f["input_ids"])
        input_ids = torch.full((B, K, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, K, T), dtype=torch.long)
        completion_mask = torch.zeros((B, K, T), dtype=torch.long)
        scores = torch.zeros((B, K), dtype=torch.float32)
        group_mask = torch.zeros((B, K), dtype=torch.bool)
        for b, f in enumerate(features):
            for k, (ids, cm) in enumerate(zip(f["input_ids"], f["completion_mask"])):
                input_ids[b, k, : len(ids)] = torch.tensor(ids)
                attention_mask[b, k, : len(ids)] = 1
                completion_mask[b, k, : len(cm)] = torch.tensor(cm)
                scores[b, k] = f["scores"][k]
                group_mask[b, k] = True
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "completion_mask": completion_mask, "scores": scores, "group_mask": group_mask}


def render_prompt(tokenizer, prompt: Any, where: str, *, chat_template: bool = False,
                  system_prompt: Optional[str] = None, chat_template_kwargs: Optional[dict] = None) -> str:
    """A prompt as text. Strings pass through, or with `chat_template` / `system_prompt` become a
    user message; chat message lists go through the tokenizer's chat template (with
    `chat_template_kwargs`, e.g. {"enable_thinking": False} for Qwen3's), after the system
    message when one is given and the list has none."""
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{where}: empty prompt")
        if not (chat_template or system_prompt):
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        if system_prompt and not any(m["role"] == "system" for m in prompt):
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{where}: prompt is a list of chat messages but the tokenizer has no chat template")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {}))
    raise DataError(f"{where}: prompt must be a string or a list of {{role, content}} messages, got {prompt!r:.80}")


def load_prompt_dataset(tokenizer, *, path: Optional[str] = None, name: Optional[str] = None,
                        config_name: Optional[str] = None, split: str = "train",
                        prompt_column: str = "prompt", chat_template: bool = False,
                        system_prompt: Optional[str] = None,
                        chat_template_kwargs: Optional[dict] = None) -> list[dict]:
    """Prompt records for online GRPO: each a dict with `prompt` (the text the model continues,
    see `render_prompt`), `raw_prompt` (the source's prompt, a string or a list of chat
    messages, as TRL hands it to reward functions) and every other column of the source,
    unchanged (they are passed to the reward functions)."""
    if path is not None:
        rows = [(f"{path}:{line}", r) for line, r in iter_json_records(path)]
    else:
        import datasets

        ds = datasets.load_dataset(name, config_name, split=split)
        rows = [(f"{name}[{split}] row {i}", r) for i, r in enumerate(ds)]
    records = []
    for where, r in rows:
        if not isinstance(r, dict) or prompt_column not in r:
            raise DataError(f"{where}: missing column '{prompt_column}'")
        rec = {k: v for k, v in r.items() if k != prompt_column}
        rec["prompt"] = render_prompt(tokenizer, r[prompt_column], where, chat_template=chat_template,
                                      system_prompt=system_prompt, chat_template_kwargs=chat_template_kwargs)
        rec["raw_prompt"] = r[prompt_column]
        records.append(rec)
    if not records:
        raise DataError(f"{path or name}: no prompts")
    return records


def prompt_records(cfg: "Config", tokenizer, path: Optional[str], hub: bool = False) -> list[dict]:
    """Prompt records from a file, or (with `hub`, when path is None) from the configured
    `datasets` hub dataset, rendered as the config asks (chat template, system prompt)."""
    o = cfg.online
    hub_args = dict(name=o.dataset_name, config_name=o.dataset_config, split=o.dataset_split) if hub else {}
    return load_prompt_dataset(tokenizer, path=path, prompt_column=o.prompt_column,
                               chat_template=o.chat_template, system_prompt=o.system_prompt,
                               chat_template_kwargs=o.chat_template_kwargs, **hub_args)


def reward_inputs(records: list[dict], texts: list[str], num_generations: int) -> tuple[list, list]:
    """(prompts, completions) as TRL hands them to reward functions, for `records` and their
    G = `num_generations` adjacent completions each: the source's prompt, repeated G times; and
    for a conversational prompt (a list of chat messages) the completion as
    [{"role": "assistant", "content": text}], else the text."""
    prompts, completions = [], []
    for i, record in enumerate(records):
        raw = record.get("raw_prompt", record["prompt"])
        for text in texts[i * num_generations:(i + 1) * num_generations]:
            prompts.append(raw)
            completions.append([{"role": "assistant", "content": text}] if isinstance(raw, list) else text)
    return prompts, completions


class PromptStream:
    """An endless stream of prompt indices, each epoch a fresh seeded permutation.

    `position` (prompts consumed so far) is all the state there is, so a checkpoint restores the
    exact stream. A step may straddle two epochs; no prompt is dropped or padded."""

    def __init__(self, num_prompts: int, seed: int, position: int = 0):
        self.num_prompts, self.seed, self.position = num_prompts, seed, position
        self._epoch, self._order = -1, []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_prompts, generator=generator).tolist()
        return self._order

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            epoch, offset = divmod(self.position, self.num_prompts)
            chunk = self._permutation(epoch)[offset:offset + k - len(out)]
            out += chunk
            self.position += len(chunk)
        return out

    @property
    def epoch(self) -> float:
        return self.position / self.num_prompts
