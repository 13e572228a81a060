"""Offline data: the seed's format, every bad-record error with file and line, batching."""

import json

import pytest
import torch

from grpo_fast.data import (DataError, GroupCollator, load_offline_dataset, load_prompt_dataset,
                            load_scored_records, tokenize_group)
from grpo_fast.modeling import build_byte_tokenizer

GOOD = {"prompt": "1+1=", "completions": [{"text": "2", "score": 1.0}, {"text": "3", "score": 0.0}]}


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_shipped_data_and_seed_example_load():
    assert len(load_scored_records("data/arithmetic_train.jsonl")) == 3000
    assert len(load_scored_records("data/arithmetic_eval.jsonl")) == 300
    (seed,) = load_scored_records("data/seed_example.json")
    assert seed["prompt"].startswith("Prove that the square root of 2")
    assert seed["scores"] == [3.2, 1.8, 0.4]


@pytest.mark.parametrize("bad, problem", [
    ({"completions": GOOD["completions"]}, "missing key 'prompt'"),
    ({"prompt": "x"}, "missing key 'completions'"),
    ({"prompt": "", "completions": GOOD["completions"]}, "'prompt' must be a non-empty string"),
    ({"prompt": "x", "completions": [{"text": "a", "score": 1}]}, "at least 2 entries"),
    ({"prompt": "x", "completions": [{"text": "a", "score": 1}, {"text": "b"}]},
     "completions[1]: missing key 'score'"),
    ({"prompt": "x", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": float("nan")}]},
     "completions[1].score must be a finite number"),
    ({"prompt": "x", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": "high"}]},
     "completions[1].score must be a finite number"),
    ({"prompt": "x", "completions": [{"text": 5, "score": 1}, {"text": "b", "score": 0}]},
     "completions[0].text must be a string"),
    (["not", "an", "object"], "record must be an object"),
])
def test_bad_records_name_file_and_line(tmp_path, bad, problem):
    # NaN is not JSON: json.dumps writes NaN, which Python's json reads back as float('nan').
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_scored_records(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert problem in str(info.value)
    # skip_invalid keeps the good records and drops the bad one.
    assert len(load_scored_records(path, skip_invalid=True)) == 3


def test_invalid_json_line_and_json_array_line_numbers(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{not json}\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON"):
        load_scored_records(str(path))
    arr = tmp_path / "arr.json"
    arr.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps({"prompt": "x"}) + "\n]\n")
    with pytest.raises(DataError, match=r"arr\.json:3: missing key 'completions'"):
        load_scored_records(str(arr))
    with pytest.raises(DataError, match="file not found"):
        load_scored_records(str(tmp_path / "none.jsonl"))


def test_tokenize_masks_only_completion_and_keeps_its_end(tok):
    g = tokenize_group(tok, "12+34=", ["46", "4600000"], max_seq_length=9)
    ids, cmask = g["input_ids"], g["completion_mask"]
    assert tok.decode(ids[0]) == "12+34=46" + tok.eos_token
    assert cmask[0] == [0] * 6 + [1, 1, 1]
    # Truncated from the left: the completion's end and EOS survive.
    assert len(ids[1]) == 9 and ids[1][-1] == tok.eos_token_id
    assert tok.decode(ids[1][:-1]) == "=4600000" and cmask[1] == [0] + [1] * 8


def test_collator_pads_groups_of_different_sizes(tmp_path, tok):
    rec3 = {"prompt": "a", "completions": [{"text": "b", "score": 1}, {"text": "cc", "score": 2},
                                           {"text": "ddd", "score": 3}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, rec3])
    ds = load_offline_dataset(path, tok, max_seq_length=64)
    batch = GroupCollator(tok.pad_token_id)([ds[0], ds[1]])
    B, K, T = batch["input_ids"].shape
    assert (B, K, T) == (2, 3, len("1+1=") + 1 + 1)  # the longest sequence: "1+1=" + "2" + EOS
    assert batch["group_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert torch.equal(batch["scores"][1], torch.tensor([1.0, 2.0, 3.0]))
    assert batch["completion_mask"][0, 2].sum() == 0 and batch["attention_mask"][0, 2].sum() == 0
    assert (batch["completion_mask"] <= batch["attention_mask"]).all()


def test_prompt_dataset_keeps_columns_and_renders_chat(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2=", "answer": "4"}])
    (rec,) = load_prompt_dataset(tok, path=path)
    assert rec == {"prompt": "2+2=", "answer": "4"}
    chat = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: .*no chat template"):
        load_prompt_dataset(tok, path=chat)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    try:
        (rec,) = load_prompt_dataset(tok, path=chat)
        assert rec["prompt"] == "<user>hi<assistant>"
    finally:
        tok.chat_template = None
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "<assistant>")
    try:
        (rec,) = load_prompt_dataset(tok, path=path, chat_template=True)
        assert rec == {"prompt": "<user>2+2=<assistant>", "answer": "4"}
        (rec,) = load_prompt_dataset(tok, path=path, system_prompt="End with #### N.")
        assert rec["prompt"] == "<system>End with #### N.<user>2+2=<assistant>"
        (rec,) = load_prompt_dataset(tok, path=chat, system_prompt="S")
        assert rec["prompt"] == "<system>S<user>hi<assistant>"
    finally:
        tok.chat_template = None
    missing = write_jsonl(tmp_path / "m.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: missing column 'prompt'"):
        load_prompt_dataset(tok, path=missing)
