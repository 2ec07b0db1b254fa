#!/usr/bin/env python3
"""Prints what a PPO run moved between workers, per iteration, against the
size of the base model: the adapter tensors synced to rollout workers and
all payload bytes. Usage: ppo_traffic.py JOB_DIR (a ppo job or a pipeline)."""
import glob
import json
import os
import sys


def main(job_dir):
    rows = []
    with open(os.path.join(job_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "bytes_exchanged" in r and "kl" in r:
                rows.append(r)
    if not rows:
        print("ppo traffic: no ppo iterations in", job_dir)
        return
    base = sum(
        os.path.getsize(p)
        for p in glob.glob(os.path.join(job_dir, "**", "model", "*.safetensors"), recursive=True)
    )
    sync = [r.get("bytes_adapter_sync", 0) for r in rows]
    total = [r["bytes_exchanged"] for r in rows]
    workers = rows[0].get("rollout_workers", 0)
    mib = lambda b: b / 2**20
    print(f"ppo traffic over {len(rows)} iterations, {workers} rollout workers:")
    print(f"  adapter sync  {mib(sum(sync) / len(rows)):8.3f} MiB per iteration")
    print(f"  all payloads  {mib(sum(total) / len(rows)):8.3f} MiB per iteration")
    if base:
        print(f"  base model    {mib(base):8.3f} MiB (adapter sync is {100 * sum(sync) / len(rows) / base:.2f}% of it)")


if __name__ == "__main__":
    main(sys.argv[1])
