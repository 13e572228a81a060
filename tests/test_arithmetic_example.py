"""The shipped arithmetic warm-start (examples/arithmetic/sft-30): it loads offline with the Auto
classes, its tokenizer encodes prompts the way the GRPO trainer expects, its data files are the
documented split, and the model is about as accurate as its training log says."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "examples" / "arithmetic"
SFT_DIR = EXAMPLE_DIR / "sft-30"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def make_sft():
    spec = importlib.util.spec_from_file_location("make_sft", EXAMPLE_DIR / "make_sft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(SFT_DIR)


def test_tokenizer_ids_and_round_trip(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 17
    assert tokenizer.convert_tokens_to_ids(list("0123456789+=? ")) == list(range(3, 17))

    text = "12+34=46"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(plain) == len(text)
    assert tokenizer.decode(plain) == text
    # The GRPO trainer encodes prompts with add_special_tokens=True: exactly BOS in front.
    assert tokenizer(text, add_special_tokens=True)["input_ids"] == [tokenizer.bos_token_id] + plain
    assert tokenizer.decode(plain + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer("1 + 2 = ?")["input_ids"], skip_special_tokens=True) == "1 + 2 = ?"


def test_shipped_tokenizer_matches_the_script(tokenizer, make_sft):
    built = make_sft.build_tokenizer()
    assert built.get_vocab() == tokenizer.get_vocab()
    for text in ("0+0=", "99+99=198", "7 ?"):
        assert built(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_data_split(make_sft):
    train = read_jsonl(SFT_DIR / "train.jsonl")
    held_out = read_jsonl(SFT_DIR / "eval.jsonl")
    assert (len(train), len(held_out)) == (9800, 200)
    for record in train + held_out:
        a, b = record["prompt"].removesuffix("=").split("+")
        assert record["prompt"] == f"{int(a)}+{int(b)}="
        assert record["answer"] == str(int(a) + int(b))
    train_prompts = {r["prompt"] for r in train}
    eval_prompts = {r["prompt"] for r in held_out}
    assert not train_prompts & eval_prompts
    assert len(train_prompts | eval_prompts) == 100 * 100
    assert (train, held_out) == make_sft.make_problems()


def test_held_out_accuracy_matches_log(tokenizer):
    log = json.loads((SFT_DIR / "sft_log.json").read_text())
    assert log["accuracy"] >= 0.30
    model = AutoModelForCausalLM.from_pretrained(SFT_DIR)
    model.eval()
    records = read_jsonl(SFT_DIR / "eval.jsonl")[:50]

    # Left padding, as the GRPO trainer batches prompts of different lengths.
    tokenizer.padding_side = "left"
    batch = tokenizer([r["prompt"] for r in records], add_special_tokens=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=4,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    completions = out[:, batch["input_ids"].size(1):].tolist()
    solved = 0
    for record, completion in zip(records, completions):
        target = tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        solved += completion[:len(target)] == target
    accuracy = solved / len(records)
    # A ~30%-accurate model; 50 prompts leave a wide sampling band around the logged value.
    assert 0.15 <= accuracy <= 0.6, accuracy
