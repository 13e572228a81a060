"""Generate the shipped online-GRPO example: repeat a letter three times.

    python data/make_tiny_online.py           # writes data/repeat_letters.jsonl

One record per lowercase letter: the prompt "c=" with the column `answer` = "ccc".
configs/tiny-online.yaml scores completions with `grpo_fast.tasks:char_match` (dense
per-character closeness, full marks only for exactly "ccc" then EOS) and tracks `exact_match`.
A random-weight model first learns to emit lowercase letters, then letters near the prompt's,
then to stop after three, then the exact letter: a curve that rises within minutes on a CPU.
The 26 prompts are also the eval set: a model trained from random weights on a few letters has no
way to know unseen ones, so the eval measures the greedy policy on the training prompts.
"""

import json
import string
from pathlib import Path

OUT = Path(__file__).resolve().parent / "repeat_letters.jsonl"
REPEAT = 3


def main() -> None:
    with open(OUT, "w") as f:
        for letter in string.ascii_lowercase:
            f.write(json.dumps({"prompt": f"{letter}=", "answer": letter * REPEAT}) + "\n")
    print(f"wrote {OUT}: {len(string.ascii_lowercase)} prompts")


if __name__ == "__main__":
    main()
