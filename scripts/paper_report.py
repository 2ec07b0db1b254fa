#!/usr/bin/env python3
"""The paper's Tables 3-5 from a finished scripts/paper.sh run, as Markdown.

Usage: paper_report.py RUN_DIR OUT_DIR [--preset P --minutes M --commit C]
  RUN_DIR  the pipeline job's directory (stages/*/outcome.json, metrics.jsonl)
  OUT_DIR  paper.sh's output directory (crosscheck-*.jsonl, report/*.png);
           OUT_DIR/summary.json gets the headline figures, machine-readable
           (accuracies in percent, choice mode on test_public):
           {"preset", "minutes", "commit",
            "rm": {"dev": {<task>, "mean"}, "test": {<task>, "mean"}},
            "test": {"base": {<task>, "avg"}, "sft": {..., "method"}, "sft-<method>": {...},
                     "ppo": [{"seed", <task>, "avg", "kl", "valid_share"}, ...], "ppo-label": {...},
                     "<stage>": {...} for each other RLHF stage (dpo-mc, grpo-label, grpo-rm)}}

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
# The policy-optimisation stages: rows of Tables 4 and 5.
RL_KINDS = ("ppo", "grpo", "rloo", "dpo")
METHODS = ["lora", "ssf", "repadapter", "full"]


def stage_order(run):
    """Stage names in the job file's order."""
    import tomllib

    return [st["name"] for st in tomllib.load(open(os.path.join(run, "job.toml"), "rb")).get("stage", [])]


def best_sft(outcomes):
    """The SFT stage the pipeline merged under the later stages, by its rule
    (worker/src/train/run.rs best_sft): the best dev accuracy, a tie going
    to the later stage only when it is the last one; the last when none
    was evaluated."""
    sft = [o for o in outcomes.values() if o["kind"] == "sft"]
    if not sft:
        return None
    nan = float("nan")
    score = lambda o: o.get("final_metrics", {}).get("eval_accuracy", nan)
    best = sft[-1]
    for o in sft:
        s, b = score(o), score(best)
        if s > b or (b != b and s == s):
            best = o
    return best


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
    """What scored an RLHF stage, from the run's resolved job file."""
    if outcomes[stage]["kind"] == "dpo":
        return "DPO on preference pairs"
    job = os.path.join(outcomes[stage]["_run"], "job.toml")
    try:
        import tomllib

        spec = tomllib.load(open(job, "rb"))
        for st in spec.get("stage", []):
            if st["name"] == stage:
                kind = st.get("ppo", {}).get("reward", {}).get("kind", "?")
                algo = "" if st.get("kind", "ppo") == "ppo" else st["kind"].upper() + ", "
                return algo + {"model": "reward model", "label": "label reward"}.get(kind, kind)
    except (OSError, ValueError, KeyError):
        pass
    return "?"


def pct(x):
    return "-" if x is None else f"{100.0 * x:.2f}"


def stage_seeds(run):
    """Stage name -> its seed (the stage's own, else the job's)."""
    import tomllib

    spec = tomllib.load(open(os.path.join(run, "job.toml"), "rb"))
    return {st["name"]: st.get("seed", spec.get("seed", 0)) for st in spec.get("stage", [])}


def window(rows, key, first):
    """Mean of `key` over the first (or last) quarter of `rows` (at least one)."""
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not vals:
        return None
    k = max(1, len(vals) // 4)
    part = vals[:k] if first else vals[-k:]
    return sum(part) / len(part)


def fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    if sys.argv[2:3] == ["--best-sft"]:  # paper.sh: which SFT stage PPO built on
        best = best_sft(load_outcomes(sys.argv[1]))
        sys.exit(print(best["stage"]) if best else "paper_report.py: no SFT stage")
    run, out = sys.argv[1], sys.argv[2]
    opts = {"preset": None, "minutes": None, "commit": None}
    rest = sys.argv[3:]
    while rest:
        key, value = rest[0].removeprefix("--"), rest[1]
        if key not in opts:
            sys.exit(f"paper_report.py: unknown option --{key}")
        opts[key] = float(value) if key == "minutes" else value
        rest = rest[2:]
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

    models = ["base"] + [f"sft-{m}" for m in METHODS if f"sft-{m}" in outcomes] + [n for n, o in outcomes.items() if o["kind"] in RL_KINDS]
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
    ppo = [n for n, o in outcomes.items() if o["kind"] in RL_KINDS]
    best = best_sft(outcomes)
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

    lines += ["## Reward models (pairwise accuracy)", "",
              "Multiple-choice pairs: every example against every wrong option in the paper's three formats "
              "(1: explained correct ≻ bare correct; 2: explained correct ≻ explained wrong; 3: bare correct ≻ "
              "explained wrong). dev: pairs from dev_few_all (steps were chosen on them); test: pairs from a stride of "
              "test_public, scored once by the final model. Bare: the correct letter alone against each wrong letter "
              "alone (what a one-token PPO response meets; trained on only with data.bare_pairs), pooled over pairs.", "",
              "| stage | set | pairs | " + " | ".join(TASKS) + " | mean of tasks | format 1 / 2 / 3 | bare | first loss | last loss |",
              "|---|---|---:|" + "---:|" * len(TASKS) + "---:|---|---:|---:|---:|"]
    for n, o in outcomes.items():
        if o["kind"] != "reward":
            continue
        ms = [r for r in metrics.get(n, []) if "loss" in r]
        fm = o.get("final_metrics", {})
        first = f"{ms[0]['loss']:.4f}" if ms else "-"
        last = f"{ms[-1]['loss']:.4f}" if ms else "-"
        for label, prefix, bare, count in [("dev", "accuracy", "bare_answer_accuracy", "eval_pairs"),
                                           ("test", "test_accuracy", "bare_test_accuracy", "test_pairs")]:
            if prefix not in fm:
                continue
            cells = [pct(fm.get(f"{prefix}_{t}")) for t in TASKS]
            formats = " / ".join(pct(fm.get(f"{prefix}_format{k}")) for k in (1, 2, 3))
            mean = fm.get(f"{prefix}_mean", fm.get(prefix))
            lines.append(f"| {n} | {label} | {fm.get(count, '-')} | " + " | ".join(cells) +
                         f" | {pct(mean)} | {formats} | {pct(fm.get(bare))} | {first} | {last} |")
    lines.append("")

    if ppo:
        lines += ["## PPO runs: reward hacking made visible", "",
                  "Per run, the first and the last quarter of its iterations (means): the reward, the KL to the SFT "
                  "model, the mean response length (tokens, EOS included), the share of sampled responses that are a "
                  "valid answer of the task and that are correct, and the reward model's mean score of the correct "
                  "and of the other sampled responses. A policy that games the reward raises the reward while the "
                  "correct share or the gap between the two scores falls.", "",
                  "| run | seed | reward | KL | response length | valid share | correct share | score of correct | score of others |",
                  "|---|---:|---|---|---|---|---|---|---|"]
        seeds = stage_seeds(run)
        for n in ppo:
            ms = [r for r in metrics.get(n, []) if "reward_mean" in r]
            if not ms:
                continue
            cell = lambda key: f"{fmt(window(ms, key, True))} → {fmt(window(ms, key, False))}"
            lines.append(f"| {n} ({reward_kind(outcomes, n)}) | {seeds.get(n, '-')} | {cell('reward_mean')} | {cell('kl')} | "
                         f"{cell('response_len')} | {cell('valid_share')} | {cell('sample_accuracy')} | "
                         f"{cell('score_correct')} | {cell('score_wrong')} |")
        lines.append("")

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
    summary = make_summary(run, outcomes, metrics, acc, sft_best)
    summary.update({k: v for k, v in opts.items() if v is not None})
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)


def make_summary(run, outcomes, metrics, acc, sft_best):
    """summary.json's figures (see the module doc), in percent."""
    def p(x):
        return None if x is None else round(100.0 * x, 2)

    def test_row(model):
        row = {}
        for t in TASKS:
            a = acc(model, t, "choice")
            row[t] = p(a["accuracy"]) if a else None
        vals = [v for v in row.values() if v is not None]
        row["avg"] = round(sum(vals) / len(vals), 2) if len(vals) == len(TASKS) else None
        return row

    rm = {}
    rms = [o for o in outcomes.values() if o["kind"] == "reward" and "test_accuracy" in o.get("final_metrics", {})]
    rms = rms or [o for o in outcomes.values() if o["kind"] == "reward"]
    if rms:
        fm = rms[-1].get("final_metrics", {})
        for label, prefix in [("dev", "accuracy"), ("test", "test_accuracy")]:
            if prefix in fm:
                rm[label] = {t: p(fm.get(f"{prefix}_{t}")) for t in TASKS}
                rm[label]["mean"] = p(fm.get(f"{prefix}_mean", fm.get(prefix)))
        rm["stage"] = rms[-1]["stage"]
    test = {"base": test_row("base")}
    if sft_best:
        test["sft"] = {**test_row(sft_best), "method": sft_best.removeprefix("sft-")}
    for m in METHODS:
        if f"sft-{m}" in outcomes:
            test[f"sft-{m}"] = test_row(f"sft-{m}")
    seeds = stage_seeds(run)
    runs = []
    for n, o in outcomes.items():
        if o["kind"] not in RL_KINDS:
            continue
        ms = [r for r in metrics.get(n, []) if "reward_mean" in r]
        row = {"stage": n, "seed": seeds.get(n), **test_row(n),
               "kl": window(ms, "kl", False), "valid_share": window(ms, "valid_share", False)}
        if o["kind"] != "ppo":
            test[n] = row
        elif reward_kind(outcomes, n) == "label reward":
            test["ppo-label"] = row
        else:
            runs.append(row)
    test["ppo"] = runs
    return {"rm": rm, "test": test}


if __name__ == "__main__":
    main()
