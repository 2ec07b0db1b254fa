#!/usr/bin/env python3
"""Generate examples/data/arithmetic: short arithmetic word problems as TRL
conversational prompt-only rows with an `answer` column, for
examples/ppo-arithmetic.toml (PPO with the `exact` reward). Deterministic:

    python3 scripts/make_arithmetic.py [OUT_DIR]

Writes train.jsonl (512 rows) and test.jsonl (128 rows, held out: no
problem text appears in both).
"""

import json
import os
import random
import sys

NAMES = ["Tom", "Lily", "Ming", "Sara", "Wei", "Omar", "Ana", "Ken", "Mei", "Leo"]
THINGS = ["apples", "books", "coins", "stickers", "pencils", "marbles", "cards", "shells"]
INSTRUCTION = "Solve it and give the final answer as a number after ####."


def problem(rng):
    n, m = rng.sample(NAMES, 2)
    t = rng.choice(THINGS)
    kind = rng.randrange(5)
    a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(2, 9)
    if kind == 0:
        return f"{n} has {a} {t}. {m} gives {n} {b} more. How many {t} does {n} have now?", a + b
    if kind == 1:
        a = a + b
        return f"{n} had {a} {t} and gave {b} of them to {m}. How many {t} does {n} have left?", a - b
    if kind == 2:
        return f"{n} buys {c} boxes with {b} {t} in each box. How many {t} does {n} buy?", c * b
    if kind == 3:
        return (
            f"{n} has {a} {t}, {m} has {b} {t}, and they find {c} more together. How many {t} do they have in all?",
            a + b + c,
        )
    total = c * b
    return f"{n} shares {total} {t} equally among {c} friends. How many {t} does each friend get?", b


def rows(rng, n, avoid):
    out, seen = [], set(avoid)
    while len(out) < n:
        q, ans = problem(rng)
        if q in seen:
            continue
        seen.add(q)
        out.append({"prompt": [{"role": "user", "content": f"{q} {INSTRUCTION}"}], "answer": str(ans)})
    return out, seen


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../examples/data/arithmetic")
    os.makedirs(out, exist_ok=True)
    rng = random.Random(2026)
    test, seen = rows(rng, 128, ())
    train, _ = rows(rng, 512, seen)
    for name, data in (("train.jsonl", train), ("test.jsonl", test)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            for r in data:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(out, len(train), len(test))


if __name__ == "__main__":
    main()
