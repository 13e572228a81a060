"""Build the arithmetic warm-start that the GRPO example starts from: a character-level tokenizer,
a tiny Llama, and a supervised fine-tune on two-digit addition stopped at 30% held-out accuracy.

    python examples/arithmetic/make_sft.py [--out examples/arithmetic/sft-30]

What it writes to --out:
  - the model (`config.json`, `generation_config.json`, `model.safetensors`, fp32) and the
    tokenizer (`tokenizer.json`, `tokenizer_config.json`), loadable with
    `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(out)`;
  - `train.jsonl` (9800 records) and `eval.jsonl` (200 records), one `{"prompt": "12+34=",
    "answer": "46"}` per line;
  - `sft_log.json`: the stopping step, the held-out accuracy there, the seed, the wall time and
    the accuracy at every check.

Tokenizer: one token per character. Ids are fixed: `<pad>` 0, `<bos>` 1, `<eos>` 2, then
`0`..`9` 3..12, `+` 13, `=` 14, `?` 15, ` ` 16 (17 in all). Any other character is an error.
`tokenizer(text, add_special_tokens=True)` puts exactly `<bos>` in front and nothing at the end,
which is how the GRPO trainer encodes prompts; it then generates after the prompt and stops on
`tokenizer.eos_token_id`. Decoding joins the characters with nothing in between.

Data: every problem `f"{a}+{b}="` with a, b in 0..99 (10,000), shuffled with `random.Random(0)`;
the first 200 are held out for eval, the rest are train. A training sequence is
`<bos> prompt answer <eos>`, and the loss covers only the answer digits and the `<eos>`.

Model: `LlamaForCausalLM`, hidden 128, 3 layers, 4 heads (head dim 32, no GQA), MLP 512 (4x),
tied input/output embeddings, 32 positions (the longest sequence is 11 tokens), fp32, about
0.8M parameters (a 3 MB checkpoint).

Training: AdamW (torch defaults otherwise: betas 0.9/0.999, weight decay 0.01), batch 128, lr 1e-3
after a 50-step linear warm-up, then constant, gradient norm clipped at 1.0. Every 25 steps the
model greedily decodes up to 4 tokens after each held-out prompt; a problem counts as solved when
those tokens are exactly the digits of `str(a+b)` followed by `<eos>`. Training stops at the
first check where held-out accuracy reaches 0.30 (step 275, 0.34: accuracy climbs 0.05 -> 0.25
over steps 125-250, then 0.34).

Why lr 1e-3: it is the warm-start GRPO improves fastest among those tried (same script, only the
lr changed; held-out accuracy after 800 steps of configs/arithmetic-grpo.yaml):
  * lr 3e-3 sits near 0.1 for 700 steps and stops mid-jump at step 900 (0.335): GRPO gains 0.15
    in its first 70 steps, then stalls (0.515);
  * lr 1e-3 stops at step 275 (0.34): 0.625, and 0.77 by GRPO step 1500;
  * lr 2e-3 overshoots, to 0.385 at step 250; lr 3e-4 stops at 325 (0.31): 0.54; lr 1e-4 at 475 (0.30): GRPO *lowers* accuracy (0.22).

Reproducibility: seeds are fixed (0), the data order comes from a single-threaded
`random.Random`, deterministic algorithms are on, and torch runs on one thread, because CPU
matmul reductions may split differently with a different thread count. Two runs on the same
machine and software stack write byte-identical model, tokenizer and jsonl files (only the wall
time in `sft_log.json` differs); a CPU with other vector instructions may round differently.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 0
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
CHARACTERS = "0123456789+=? "
NUM_EVAL = 200
# The longest sequence is 11 tokens: <bos> 99+99= 198 <eos>.
MAX_POSITIONS = 32
TARGET_ACCURACY = 0.30
EVAL_EVERY = 25
MAX_STEPS = 20_000
BATCH_SIZE = 128
LR = 1e-3
WARMUP_STEPS = 50
GRAD_CLIP = 1.0
# Answers are at most 3 digits (99+99=198), plus the EOS.
MAX_NEW_TOKENS = 4


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for i, ch in enumerate(CHARACTERS):
        vocab[ch] = 3 + i
    # No unk token: a character outside the vocabulary raises instead of being silently mapped.
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Fuse concatenates the tokens as they are; the default would put spaces between them.
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tok.add_special_tokens([PAD, BOS, EOS])
    # clean_up_tokenization_spaces would turn " ?" into "?" on decode.
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   clean_up_tokenization_spaces=False, model_max_length=MAX_POSITIONS)


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=512, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def make_problems() -> tuple[list[dict], list[dict]]:
    problems = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(100) for b in range(100)]
    random.Random(SEED).shuffle(problems)
    return problems[NUM_EVAL:], problems[:NUM_EVAL]


def encode_example(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) for `<bos> prompt answer <eos>`; prompt positions are labelled -100."""
    prompt = tokenizer(record["prompt"], add_special_tokens=True)["input_ids"]
    answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence. Padding goes after the EOS, so under the causal mask no
    real token ever attends to it and no attention mask is needed."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
    return input_ids, labels


@torch.no_grad()
def greedy_accuracy(model, tokenizer, records: list[dict]) -> float:
    """Exact-match rate of greedy decoding: the answer's digits, then EOS, within 4 new tokens.

    Prompts are grouped by token length, so each `generate` call sees an unpadded batch."""
    by_length: dict[int, list[tuple[list[int], list[int]]]] = {}
    for r in records:
        prompt = tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
        target = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        by_length.setdefault(len(prompt), []).append((prompt, target))
    was_training = model.training
    model.eval()
    solved = 0
    for length in sorted(by_length):
        group = by_length[length]
        prompts = torch.tensor([p for p, _ in group])
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                             do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for (_, target), row in zip(group, out[:, length:].tolist()):
            solved += row[:len(target)] == target
    model.train(was_training)
    return solved / len(records)


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "sft-30"),
                        help="output directory (default: examples/arithmetic/sft-30)")
    args = parser.parse_args()
    out = Path(args.out)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    train, held_out = make_problems()
    examples = [encode_example(tokenizer, r) for r in train]

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    order_rng = random.Random(SEED)
    order: list[int] = []
    history = []
    model.train()
    step, accuracy = 0, 0.0
    while step < MAX_STEPS:
        if len(order) < BATCH_SIZE:
            # A fresh shuffle per epoch; the leftover partial batch is carried into the next epoch.
            epoch = list(range(len(examples)))
            order_rng.shuffle(epoch)
            order += epoch
        batch, order = order[:BATCH_SIZE], order[BATCH_SIZE:]
        input_ids, labels = collate([examples[i] for i in batch], tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % EVAL_EVERY == 0:
            accuracy = greedy_accuracy(model, tokenizer, held_out)
            history.append({"step": step, "loss": round(loss.item(), 4), "accuracy": accuracy})
            print(f"step {step:5d}  loss {loss.item():.4f}  held-out accuracy {accuracy:.3f}", flush=True)
            if accuracy >= TARGET_ACCURACY:
                break
    else:
        raise SystemExit(f"held-out accuracy {accuracy:.3f} < {TARGET_ACCURACY} after {MAX_STEPS} steps")
    wall_time = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held_out)
    log = {"step": step, "accuracy": accuracy, "seed": SEED, "wall_time_s": round(wall_time, 1),
           "torch_threads": 1, "batch_size": BATCH_SIZE, "lr": LR, "eval_every": EVAL_EVERY,
           "history": history}
    (out / "sft_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"stopped at step {step}: held-out accuracy {accuracy:.3f} ({wall_time:.1f} s); wrote {out}")


if __name__ == "__main__":
    main()
