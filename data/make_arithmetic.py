"""Generate the shipped offline-GRPO example: two-digit addition with scored completions.

    python data/make_arithmetic.py            # writes data/arithmetic_{train,eval}.jsonl

Each record is a prompt "a+b=" with 6 completions, scored by correctness and closeness:
the right sum scores 1.0, a near miss (off by 1-3) 0.5, a far number 0.2, and a malformed
answer (not a number, repeated or with trailing junk) 0.0. The mix makes the task learnable by
a tiny model from random weights in minutes (well-formedness first, then the last digit, then
the rest), while the held-out file measures ranking of unseen sums. Deterministic (seed 0).
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent
SCORES = {"correct": 1.0, "near": 0.5, "far": 0.2, "malformed": 0.0}


def completions(rng: random.Random, a: int, b: int) -> list[dict]:
    answer = a + b
    near = set()
    while len(near) < 2:
        candidate = answer + rng.choice([-3, -2, -1, 1, 2, 3])
        if candidate >= 0:
            near.add(candidate)
    far = answer
    while abs(far - answer) < 10:
        far = rng.randint(0, 198)
    malformed = rng.choice([f"{answer}{answer}", f"{answer}?", f"={answer}", "??", f"{a}+{b}",
                            f"{answer} {rng.randint(0, 9)}"])
    out = [{"text": str(answer), "score": SCORES["correct"]}]
    out += [{"text": str(n), "score": SCORES["near"]} for n in sorted(near)]
    out += [{"text": str(far), "score": SCORES["far"]},
            {"text": malformed, "score": SCORES["malformed"]},
            {"text": str(rng.randint(200, 999)), "score": SCORES["far"]}]
    rng.shuffle(out)
    return out


def main() -> None:
    rng = random.Random(0)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    splits = {"arithmetic_eval.jsonl": pairs[:300], "arithmetic_train.jsonl": pairs[300:3300]}
    for name, split in splits.items():
        with open(OUT / name, "w") as f:
            for a, b in split:
                f.write(json.dumps({"prompt": f"{a}+{b}=", "completions": completions(rng, a, b)}) + "\n")
        print(f"wrote {OUT / name}: {len(split)} groups")


if __name__ == "__main__":
    main()
