//! `report.md`: the paper's tables from stage outcomes — trainable
//! parameters, ratio and training time per method (Table 3), and accuracy
//! per task and model/stage (Tables 4–5).

use std::collections::BTreeSet;
use std::fmt::Write;

use super::stage::Outcome;

pub fn markdown(title: &str, outcomes: &[Outcome]) -> String {
    let mut s = format!("# {title}\n\n");
    let trained: Vec<&Outcome> = outcomes.iter().filter(|o| o.trainable_params > 0).collect();
    if !trained.is_empty() {
        s.push_str("## Trainable parameters and training time (Table 3)\n\n");
        s.push_str("| stage | method | trainable params | ratio | training time (s) | steps |\n|---|---|---:|---:|---:|---:|\n");
        for o in trained {
            let ratio = if o.base_params > 0 { 100.0 * o.trainable_params as f64 / o.base_params as f64 } else { 0.0 };
            let method = o.method.map_or("-", |m| m.name());
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.4}% | {:.1} | {} |",
                o.stage, method, o.trainable_params, ratio, o.train_seconds, o.steps
            );
        }
        s.push('\n');
    }
    if outcomes.iter().any(|o| o.wall_seconds > 0.0) {
        s.push_str("## Stage wall times\n\n| stage | kind | wall time (s) |\n|---|---|---:|\n");
        for o in outcomes.iter().filter(|o| o.wall_seconds > 0.0) {
            let _ = writeln!(s, "| {} | {} | {:.1} |", o.stage, o.kind, o.wall_seconds);
        }
        let total: f64 = outcomes.iter().map(|o| o.wall_seconds).sum();
        let _ = writeln!(s, "| all | | {total:.1} |\n");
    }
    let finals: Vec<&Outcome> = outcomes.iter().filter(|o| !o.final_metrics.is_empty()).collect();
    if !finals.is_empty() {
        s.push_str("## Final training metrics\n\n| stage | metrics |\n|---|---|\n");
        for o in finals {
            let keys = ["loss", "accuracy", "accuracy_margin", "reward_mean", "kl", "eval_accuracy"];
            let parts: Vec<String> = keys
                .iter()
                .filter_map(|k| o.final_metrics.get(*k).and_then(|v| v.as_f64()).map(|v| format!("{k} {v:.4}")))
                .collect();
            let _ = writeln!(s, "| {} | {} |", o.stage, parts.join(", "));
        }
        s.push('\n');
    }
    let accs: Vec<_> = outcomes.iter().flat_map(|o| o.accuracies.iter()).collect();
    let modes: BTreeSet<&str> = accs.iter().map(|a| a.mode.as_str()).collect();
    for mode in modes {
        let tasks: Vec<&str> = {
            let mut seen = Vec::new();
            for a in accs.iter().filter(|a| a.mode == mode) {
                if !seen.contains(&a.task.as_str()) {
                    seen.push(a.task.as_str());
                }
            }
            seen
        };
        let mut models: Vec<&str> = Vec::new();
        for a in accs.iter().filter(|a| a.mode == mode) {
            if !models.contains(&a.model.as_str()) {
                models.push(a.model.as_str());
            }
        }
        let _ = writeln!(s, "## Accuracy, {mode} mode (Tables 4–5)\n");
        let _ = writeln!(s, "| model | {} | average |", tasks.join(" | "));
        let _ = writeln!(s, "|---|{}---:|", "---:|".repeat(tasks.len()));
        for m in models {
            let mut row = Vec::new();
            let mut sum = 0.0;
            for t in &tasks {
                match accs.iter().find(|a| a.mode == mode && a.model == m && a.task == *t) {
                    Some(a) => {
                        row.push(format!("{:.2} (n={})", 100.0 * a.accuracy, a.n));
                        sum += a.accuracy;
                    }
                    None => row.push("-".into()),
                }
            }
            let _ = writeln!(s, "| {m} | {} | {:.2} |", row.join(" | "), 100.0 * sum / tasks.len().max(1) as f64);
        }
        s.push('\n');
    }
    for o in outcomes {
        if let Some(p) = &o.predictions {
            let _ = writeln!(
                s,
                "Every scored example of `{}` (prompt, gold, choice, option log-probs, generated text): `{}`\n",
                o.stage,
                p.display()
            );
        }
    }
    s
}
