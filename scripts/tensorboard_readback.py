#!/usr/bin/env python3
"""Reads a run directory's TensorBoard event files with tensorboard's own
EventAccumulator and compares every scalar with metrics.jsonl (tag
`<stage>/<key>`, float32). Prints one JSON line; exits 1 on a mismatch.
Usage: tensorboard_readback.py RUN_DIR"""
import json
import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run):
    acc = EventAccumulator(run, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    got = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags}
    want, checked, bad = {}, 0, []
    for line in open(f"{run}/metrics.jsonl"):
        r = json.loads(line)
        stage = r.get("stage", "")
        for k, v in r.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            tag = f"{stage}/{k}" if stage else k
            want.setdefault(tag, {})[r["step"]] = v
    for tag, steps in want.items():
        for step, v in steps.items():
            g = got.get(tag, {}).get(step)
            checked += 1
            if g is None or not math.isclose(g, v, rel_tol=1e-6, abs_tol=1e-30) and not (math.isnan(g) and math.isnan(v)):
                bad.append((tag, step, v, g))
    print(json.dumps({"tags": len(tags), "scalars_checked": checked, "mismatches": bad[:5], "ok": not bad and checked > 0}))
    sys.exit(0 if not bad and checked > 0 else 1)


if __name__ == "__main__":
    main(sys.argv[1])
