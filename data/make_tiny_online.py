"""Generate the shipped online-GRPO example: copy a short word.

    python data/make_tiny_online.py           # writes data/copy_{train,eval}.jsonl

Each record is a prompt "cab=" with the column `answer` = "cab", the word to reproduce. Words are
3 letters from "a"-"h" (512 words); 64 are held out for eval. configs/tiny-online.yaml scores
completions with `grpo_fast.tasks:char_match` (dense per-character closeness) and tracks
`exact_match`. A random-weight model first learns to emit lowercase letters, then the right
letters in the right places, then to stop: a curve that rises within minutes on a CPU.
Deterministic (seed 0).
"""

import itertools
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent
LETTERS = "abcdefgh"
LENGTH = 3
EVAL_SIZE = 64


def main() -> None:
    words = ["".join(w) for w in itertools.product(LETTERS, repeat=LENGTH)]
    random.Random(0).shuffle(words)
    splits = {"copy_eval.jsonl": words[:EVAL_SIZE], "copy_train.jsonl": words[EVAL_SIZE:]}
    for name, split in splits.items():
        with open(OUT / name, "w") as f:
            for word in split:
                f.write(json.dumps({"prompt": f"{word}=", "answer": word}) + "\n")
        print(f"wrote {OUT / name}: {len(split)} prompts")


if __name__ == "__main__":
    main()
