#!/usr/bin/env python3
"""The paper's Tables 3-5 from a finished scripts/paper.sh run, as Markdown.

Usage: paper_report.py RUN_DIR OUT_DIR
  RUN_DIR  the pipeline job's directory (stages/*/outcome.json, metrics.jsonl)
  OUT_DIR  paper.sh's output directory (crosscheck-*.jsonl, report/*.png)

Reads only what the run wrote; every number printed comes from those files.
The paper's own Llama2-7B figures are shown when OUT_DIR/../paper_figures.json
or scripts/paper_figures.json exists ({"table3": {method: {...}}, "table4":
{method: {task: acc}}, "table5": {row: {task: acc}}}); otherwise the column
reads "n/a" (they are not in ../shared and this machine cannot fetch the
paper).
"""
import json
import os
import sys
from collections import defaultdict

TASKS = ["eprstmt", "tnews", "ocnli", "bustm"]
METHODS = ["lora", "ssf", "repadapter", "full"]


def stage_order(run):
    """Stage names in the job file's order."""
    import tomllib

    return [st["name"] for st in tomllib.load(open(os.path.join(run, "job.toml"), "rb")).get("stage", [])]


def load_outcomes(run):
    out = {}
    stages = os.path.join(run, "stages")
    for name in stage_order(run):
        p = os.path.join(stages, name, "outcome.json")
        if os.path.exists(p):
            out[name] = json.load(open(p, encoding="utf-8"))
            out[name]["_run"] = run
    return out


def load_metrics(run):
    by_stage = defaultdict(list)
    p = os.path.join(run, "metrics.jsonl")
    if os.path.exists(p):
        for line in open(p, encoding="utf-8"):
            if line.strip():
                r = json.loads(line)
                by_stage[r.get("stage", "")].append(r)
    return by_stage


def paper_figures():
    here = os.path.dirname(os.path.abspath(__file__))
    p = os.path.join(here, "paper_figures.json")
    return json.load(open(p, encoding="utf-8")) if os.path.exists(p) else {}


def reward_kind(outcomes, stage):
    """What scored a PPO stage, from the run's resolved job file."""
    job = os.path.join(outcomes[stage]["_run"], "job.toml")
    try:
        import tomllib

        spec = tomllib.load(open(job, "rb"))
        for st in spec.get("stage", []):
            if st["name"] == stage:
                kind = st.get("ppo", {}).get("reward", {}).get("kind", "?")
                return {"model": "reward model", "label": "label reward"}.get(kind, kind)
    except (OSError, ValueError, KeyError):
        pass
    return "?"


def pct(x):
    return "-" if x is None else f"{100.0 * x:.2f}"


def main():
    run, out = sys.argv[1], sys.argv[2]
    outcomes = load_outcomes(run)
    metrics = load_metrics(run)
    paper = paper_figures()
    p3, p4, p5 = paper.get("table3", {}), paper.get("table4", {}), paper.get("table5", {})
    lines = ["# The paper's experiment: Qwen2.5-Coder-0.5B on FewCLUE", ""]
    job = os.path.join(run, "job.toml")
    lines += [f"Run: `{run}` (resolved job file `{job}`). Every figure below is read from that run's files.", ""]

    lines += ["## Stage wall times", "", "| stage | kind | wall time (s) | training time (s) | steps |", "|---|---|---:|---:|---:|"]
    total = 0.0
    for name, o in outcomes.items():
        total += o.get("wall_seconds", 0.0)
        lines.append(f"| {name} | {o['kind']} | {o.get('wall_seconds', 0.0):.0f} | {o['train_seconds']:.0f} | {o['steps']} |")
    lines += [f"| all | | {total:.0f} | | |", ""]

    evals = [o for o in outcomes.values() if o["kind"] == "eval"]
    accs = evals[0]["accuracies"] if evals else []

    def acc(model, task, mode):
        for a in accs:
            if a["model"] == model and a["task"] == task and a["mode"] == mode:
                return a
        return None

    def avg(model, mode):
        vals = [acc(model, t, mode) for t in TASKS]
        vals = [v["accuracy"] for v in vals if v]
        return sum(vals) / len(vals) if len(vals) == len(TASKS) else None

    lines += ["## Table 3: trainable parameters and training time per method", "",
              "| method | trainable params | ratio | training time (s) | s/step | dev accuracy (choice, mean of 4 tasks) | paper (Llama2-7B) |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for m in METHODS:
        o = outcomes.get(f"sft-{m}")
        if not o:
            continue
        ratio = 100.0 * o["trainable_params"] / o["base_params"] if o["base_params"] else 0.0
        dev = o.get("final_metrics", {}).get("eval_accuracy")
        ref = p3.get(m)
        ref = ", ".join(f"{k} {v}" for k, v in ref.items()) if ref else "n/a"
        lines.append(f"| {m} | {o['trainable_params']:,} | {ratio:.4f}% | {o['train_seconds']:.0f} | "
                     f"{o['train_seconds'] / max(o['steps'], 1):.2f} | {pct(dev)} | {ref} |")
    lines.append("")

    models = ["base"] + [f"sft-{m}" for m in METHODS if f"sft-{m}" in outcomes] + [n for n, o in outcomes.items() if o["kind"] == "ppo"]
    for mode in ["choice", "generate"]:
        if not any(a["mode"] == mode for a in accs):
            continue
        lines += [f"## Table 4: test_public accuracy per method and task, {mode} mode", "",
                  "| model | " + " | ".join(TASKS) + " | average | paper (Llama2-7B) average |", "|---|" + "---:|" * (len(TASKS) + 1) + "---|"]
        for m in models:
            cells = []
            for t in TASKS:
                a = acc(m, t, mode)
                cells.append(f"{pct(a['accuracy'])} (n={a['n']})" if a else "-")
            ref = p4.get(m.removeprefix("sft-"), {})
            ref_avg = f"{sum(ref.values()) / len(ref):.2f}" if ref else "n/a"
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {pct(avg(m, mode))} | {ref_avg} |")
        lines.append("")

    # Table 5: base → the SFT model PPO started from → PPO.
    sft_best = None
    ppo = [n for n, o in outcomes.items() if o["kind"] == "ppo"]
    best = max((o for n, o in outcomes.items() if o["kind"] == "sft"),
               key=lambda o: o.get("final_metrics", {}).get("eval_accuracy", -1), default=None)
    if best:
        sft_best = best["stage"]
    if ppo and sft_best:
        for mode in ["choice", "generate"]:
            lines += [f"## Table 5: base, SFT ({sft_best}, best on dev) and RLHF (PPO on it), {mode} mode", "",
                      "| model | " + " | ".join(TASKS) + " | average | paper (Llama2-7B) |", "|---|" + "---:|" * (len(TASKS) + 1) + "---|"]
            rows = [("base", "base"), (f"SFT ({sft_best})", sft_best)]
            rows += [(f"RLHF ({n}: {reward_kind(outcomes, n)})", n) for n in ppo]
            for label, m in rows:
                cells = [pct(acc(m, t, mode)["accuracy"]) if acc(m, t, mode) else "-" for t in TASKS]
                ref = p5.get(label.split(" ")[0], {})
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {pct(avg(m, mode))} | {', '.join(f'{k} {v}' for k, v in ref.items()) or 'n/a'} |")
            lines.append("")

    lines += ["## Reward models (held-out pairwise accuracy)", "",
              "Bare-answer accuracy: held-out prompts, the correct letter alone against a wrong letter alone (what a "
              "one-token PPO response meets; the multiple-choice construction never trains on such a pair).", "",
              "| stage | pairs | held-out pairs | accuracy | bare-answer accuracy | first loss | last loss |", "|---|---|---:|---:|---:|---:|---:|"]
    for n, o in outcomes.items():
        if o["kind"] != "reward":
            continue
        ms = [r for r in metrics.get(n, []) if "loss" in r]
        fm = o.get("final_metrics", {})
        first = f"{ms[0]['loss']:.4f}" if ms else "-"
        last = f"{ms[-1]['loss']:.4f}" if ms else "-"
        src = "FewCLUE multiple-choice" if "mc" in n else "Chinese preference pairs"
        lines.append(f"| {n} | {src} | {fm.get('eval_pairs', '-')} | {pct(fm.get('accuracy'))} | {pct(fm.get('bare_answer_accuracy'))} | {first} | {last} |")
    lines.append("")

    for n in ppo:
        ms = [r for r in metrics.get(n, []) if "reward_mean" in r]
        if not ms:
            continue
        k = max(1, len(ms) // 4)
        head = sum(r["reward_mean"] for r in ms[:k]) / k
        tail = sum(r["reward_mean"] for r in ms[-k:]) / k
        kl = ms[-1].get("kl")
        lines += [f"## PPO ({n})", "",
                  f"{len(ms)} iterations. Mean reward of the first {k}: {head:.4f}; of the last {k}: {tail:.4f}; "
                  f"KL to the SFT model at the end: {kl if kl is None else f'{kl:.4f}'}.", ""]

    checks = sorted(f for f in os.listdir(out) if f.startswith("crosscheck-") and f.endswith(".jsonl"))
    if checks:
        lines += ["## Cross-check with transformers (+ peft), choice mode, same prompt ids", "",
                  "| model | task | n | rlhfd | transformers | difference (points) | max option log-prob difference |", "|---|---|---:|---:|---:|---:|---:|"]
        for f in checks:
            name = f[len("crosscheck-"):-len(".jsonl")]
            for line in open(os.path.join(out, f), encoding="utf-8"):
                r = json.loads(line)
                if "task" in r:
                    lines.append(f"| {name} | {r['task']} | {r['n']} | {r['rlhfd_choice']:.2f} | {r['transformers_choice']:.2f} | "
                                 f"{r['diff_points']:.2f} | {r['max_option_logprob_diff']:.4f} |")
        lines.append("")
    pngs = sorted(f for f in os.listdir(os.path.join(out, "report")) if f.endswith(".png")) if os.path.isdir(os.path.join(out, "report")) else []
    if pngs:
        lines += ["## Curves", ""] + [f"- `{os.path.join(out, 'report', p)}`" for p in pngs] + [""]
    if evals and evals[0].get("predictions"):
        lines += [f"Every scored example (prompt, gold, per-option log-probs, generated text): `{evals[0]['predictions']}`", ""]
    if not paper:
        lines += ["The paper's Llama2-7B figures are not in ../shared and cannot be fetched from this machine; "
                  "put them in scripts/paper_figures.json to fill the paper columns.", ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
