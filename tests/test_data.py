"""Offline data: the seed's format, every bad-record error with file and line, batching."""

import json
import logging

import pytest
import torch

from grpo_fast.data import (DataError, GroupCollator, load_offline_dataset, load_prompt_dataset, reward_inputs,
                            load_scored_records, tokenize_group)
from grpo_fast.listwise import MAX_SCALED_SCORE
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


def test_invalid_json_line_and_json_array_line_numbers(tmp_path, caplog):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{not json}\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON"):
        load_scored_records(str(path))
    with caplog.at_level(logging.WARNING, logger="grpo_fast.data"):
        assert len(load_scored_records(str(path), skip_invalid=True)) == 2
    assert f"{path}:3: skipped invalid record: invalid JSON" in caplog.text
    assert "skipped 1 invalid record(s), kept 2" in caplog.text
    arr = tmp_path / "arr.json"
    arr.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps({"prompt": "x"}) + "\n]\n")
    with pytest.raises(DataError, match=r"arr\.json:3: missing key 'completions'"):
        load_scored_records(str(arr))
    with pytest.raises(DataError, match="file not found"):
        load_scored_records(str(tmp_path / "none.jsonl"))


def _with_byte(record, at, byte=b"\xff"):
    """`record` as one JSON line with `byte` spliced in after the character offset `at`."""
    line = json.dumps(record, ensure_ascii=False).encode()
    cut = len(json.dumps(record, ensure_ascii=False)[:at].encode())
    return line[:cut] + byte + line[cut:]


def test_non_utf8_jsonl_line_is_named_and_skippable(tmp_path, caplog):
    accented = {**GOOD, "prompt": "é1+1="}
    column = json.dumps(accented, ensure_ascii=False).index("1+1") + 1
    bad = _with_byte(accented, column - 1)
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b"\n".join([json.dumps(GOOD).encode(), bad, json.dumps(GOOD).encode(), b""]))
    with pytest.raises(DataError) as info:
        load_scored_records(str(path))
    assert str(info.value).startswith(f"{path}:2: not valid UTF-8 (byte 0xff at column {column})")
    with caplog.at_level(logging.WARNING, logger="grpo_fast.data"):
        assert len(load_scored_records(str(path), skip_invalid=True)) == 2
    assert f"{path}:2: skipped invalid record: not valid UTF-8" in caplog.text
    assert "skipped 1 invalid record(s), kept 2" in caplog.text


def test_json_array_defects_are_errors_even_with_skip_invalid(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_bytes(b"[\n" + json.dumps(GOOD).encode() + b",\n" + _with_byte(GOOD, 2, b"\xc3") + b"\n]\n")
    with pytest.raises(DataError, match=r"arr\.json:3: not valid UTF-8 \(byte 0xc3 at column 3\)"):
        load_scored_records(str(arr), skip_invalid=True)
    arr.write_text("[\n" + json.dumps(GOOD) + ",\n{not json}\n]\n")
    with pytest.raises(DataError, match=r"arr\.json:3: invalid JSON"):
        load_scored_records(str(arr), skip_invalid=True)


def test_prompt_files_stay_strict(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "2+2="}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid UTF-8 \(byte 0xff at column 13\)"):
        load_prompt_dataset(tok, path=str(path))
    path.write_text('{"prompt": "2+2="}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: invalid JSON"):
        load_prompt_dataset(tok, path=str(path))


def test_jsonl_lines_split_only_at_newlines(tmp_path):
    # U+2028 is legal inside a JSON string; str.splitlines would break the line there.
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({**GOOD, "prompt": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (record,) = load_scored_records(str(path))
    assert record["prompt"] == "a\u2028b"


@pytest.mark.parametrize("score, score_temperature, ok", [
    (MAX_SCALED_SCORE, 1.0, True),
    (-MAX_SCALED_SCORE / 4, 0.25, True),
    (1e38, 1.0, False),          # finite in float32, but a difference of two such overflows
    (MAX_SCALED_SCORE, 0.25, False),  # fine alone, overflows once divided by the temperature
    (1e38, 4.0, False),          # |score| itself counts: scores are stored in float32 first
    (1e308, 1.0, False),         # not even a float32
    (10 ** 400, 1.0, False),     # a JSON integer beyond float range
])
def test_scores_are_bounded_for_float32_and_the_temperature(tmp_path, score, score_temperature, ok):
    rec = {"prompt": "x", "completions": [{"text": "a", "score": 0}, {"text": "b", "score": score}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, rec])
    if ok:
        assert len(load_scored_records(path, score_temperature=score_temperature)) == 2
        return
    with pytest.raises(DataError) as info:
        load_scored_records(path, score_temperature=score_temperature)
    message = str(info.value)
    assert message.startswith(f"{path}:2: completions[1].score ")
    assert f"must be at most {MAX_SCALED_SCORE:.4g} (float32 max / 4)" in message


def test_offline_dataset_passes_the_score_temperature(tmp_path, tok):
    rec = {"prompt": "x", "completions": [{"text": "a", "score": 0}, {"text": "b", "score": 1e37}]}
    path = write_jsonl(tmp_path / "d.jsonl", [rec])
    assert len(load_offline_dataset(path, tok, max_seq_length=16)) == 1
    with pytest.raises(DataError, match=r"d\.jsonl:1: completions\[1\]\.score"):
        load_offline_dataset(path, tok, max_seq_length=16, score_temperature=0.01)


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
    assert rec == {"prompt": "2+2=", "raw_prompt": "2+2=", "answer": "4"}
    chat = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: .*no chat template"):
        load_prompt_dataset(tok, path=chat)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    try:
        (rec,) = load_prompt_dataset(tok, path=chat)
        assert rec["prompt"] == "<user>hi<assistant>"
        assert rec["raw_prompt"] == [{"role": "user", "content": "hi"}], "rewards get the messages"
        prompts, completions = reward_inputs([rec], ["yo", "ok"], 2)
        assert prompts == [rec["raw_prompt"]] * 2
        assert completions == [[{"role": "assistant", "content": "yo"}], [{"role": "assistant", "content": "ok"}]]
        assert reward_inputs([{"prompt": "a", "raw_prompt": "a"}], ["b"], 1) == (["a"], ["b"])
        tok.chat_template = "{{ messages[0]['content'] }}{% if enable_thinking %}<think>{% endif %}"
        (rec,) = load_prompt_dataset(tok, path=chat, chat_template_kwargs={"enable_thinking": True})
        assert rec["prompt"] == "hi<think>", "chat_template_kwargs reach the template"
    finally:
        tok.chat_template = None
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "<assistant>")
    try:
        (rec,) = load_prompt_dataset(tok, path=path, chat_template=True)
        assert rec == {"prompt": "<user>2+2=<assistant>", "raw_prompt": "2+2=", "answer": "4"}
        (rec,) = load_prompt_dataset(tok, path=path, system_prompt="End with #### N.")
        assert rec["prompt"] == "<system>End with #### N.<user>2+2=<assistant>"
        (rec,) = load_prompt_dataset(tok, path=chat, system_prompt="S")
        assert rec["prompt"] == "<system>S<user>hi<assistant>"
    finally:
        tok.chat_template = None
    missing = write_jsonl(tmp_path / "m.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match=r"m\.jsonl:1: missing column 'prompt'"):
        load_prompt_dataset(tok, path=missing)
