//! `rlhfctl report`: PNG line charts of a job's metrics records (reward, KL
//! and loss against step), one line per pipeline stage and metric.
//!
//! Text is drawn with plotters' `ab_glyph` backend and the DejaVu Sans font
//! embedded by the `dejavu` crate, so charts render identically on machines
//! without any system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use serde_json::{Map, Value};

/// One chart: the file it goes to and the metrics keys it draws.
#[derive(Clone, Copy, Debug)]
pub struct PlotSpec {
    pub file: &'static str,
    pub title: &'static str,
    pub y_desc: &'static str,
    pub keys: &'static [&'static str],
}

/// The charts of a report. PPO records carry `policy_loss`/`value_loss`
/// instead of `loss`, so the loss chart draws whichever a stage has; DPO
/// records its implicit rewards (TRL's `rewards/…`).
pub const PLOTS: [PlotSpec; 4] = [
    PlotSpec { file: "reward.png", title: "reward", y_desc: "reward_mean", keys: &["reward_mean"] },
    PlotSpec { file: "kl.png", title: "KL divergence to the reference", y_desc: "kl", keys: &["kl"] },
    PlotSpec { file: "loss.png", title: "loss", y_desc: "loss", keys: &["loss", "policy_loss", "value_loss"] },
    PlotSpec {
        file: "dpo_rewards.png",
        title: "DPO implicit rewards",
        y_desc: "beta * log-ratio",
        keys: &["rewards_chosen", "rewards_rejected", "rewards_margins"],
    },
];

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Parses metrics lines (one JSON object each); lines that are not objects are skipped.
pub fn parse_metrics(lines: &[String]) -> Vec<Map<String, Value>> {
    lines
        .iter()
        .filter_map(|l| match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        })
        .collect()
}

/// The lines of one chart: for every (stage, key) with a finite value, the
/// points (step, value) in record order. A record without `step` takes its
/// position in the stage. Series are ordered by first appearance; labels
/// are `stage key`, or just the key when no record has a stage.
pub fn series(records: &[Map<String, Value>], keys: &[&str]) -> Vec<Series> {
    struct Line {
        stage: String,
        key: String,
        points: Vec<(f64, f64)>,
    }
    let mut out: Vec<Line> = Vec::new();
    let mut seen_per_stage: Vec<(String, usize)> = Vec::new();
    for rec in records {
        let stage = rec.get("stage").and_then(Value::as_str).unwrap_or("").to_string();
        let pos = match seen_per_stage.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                seen_per_stage.push((stage.clone(), 1));
                1
            }
        };
        let x = rec.get("step").and_then(Value::as_f64).unwrap_or(pos as f64);
        for key in keys {
            let Some(y) = rec.get(*key).and_then(Value::as_f64).filter(|y| y.is_finite()) else { continue };
            match out.iter_mut().find(|l| l.stage == stage && l.key == *key) {
                Some(l) => l.points.push((x, y)),
                None => out.push(Line { stage: stage.clone(), key: key.to_string(), points: vec![(x, y)] }),
            }
        }
    }
    out.into_iter()
        .map(|l| Series {
            label: if l.stage.is_empty() { l.key } else { format!("{} {}", l.stage, l.key) },
            points: l.points,
        })
        .collect()
}

/// Writes every chart that has data into `dir` (created if missing) and
/// returns the paths written, in [`PLOTS`] order; charts without data are
/// skipped and named in the second list.
pub fn write_plots(metrics_lines: &[String], dir: &Path) -> Result<(Vec<PathBuf>, Vec<&'static str>)> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let records = parse_metrics(metrics_lines);
    let mut written = Vec::new();
    let mut skipped = Vec::new();
    for spec in PLOTS {
        let s = series(&records, spec.keys);
        if s.is_empty() {
            skipped.push(spec.file);
            continue;
        }
        let path = dir.join(spec.file);
        draw_chart(&path, spec.title, spec.y_desc, &s)?;
        written.push(path);
    }
    Ok((written, skipped))
}

fn register_font() {
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        // A failure leaves text undrawable, which draw_chart reports as an error.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Tableau 10: distinct on white.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// The axis ranges covering every point, padded so flat or single-point
/// series still get a non-empty range.
pub fn bounds(series: &[Series]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        return (0.0..1.0, 0.0..1.0);
    }
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 > y0 { (y1 - y0) * 0.05 } else { y0.abs().max(1.0) * 0.1 };
    (x0..x1, (y0 - pad)..(y1 + pad))
}

/// Draws one PNG line chart with a title, axis descriptions and a legend.
pub fn draw_chart(path: &Path, title: &str, y_desc: &str, series: &[Series]) -> Result<()> {
    register_font();
    // plotters asserts on a few degenerate layouts; keep a bad metrics file
    // from ever aborting the CLI.
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| draw_chart_inner(path, title, y_desc, series)));
    match result {
        Ok(r) => r.with_context(|| format!("failed to draw {}", path.display())),
        Err(_) => Err(anyhow!("failed to draw {}: the plotting library gave up on this data", path.display())),
    }
}

fn draw_chart_inner(path: &Path, title: &str, y_desc: &str, series: &[Series]) -> Result<()> {
    let e = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (xr, yr) = bounds(series);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(xr, yr)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let point_size = if s.points.len() < 2 { 3 } else { 0 };
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), color.stroke_width(2)).point_size(point_size))
            .map_err(|x| e(&x))?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines() -> Vec<String> {
        vec![
            r#"{"stage":"sft","step":1,"loss":2.0}"#.into(),
            r#"{"stage":"sft","step":2,"loss":1.5}"#.into(),
            "not json".into(),
            r#"{"stage":"ppo","step":1,"reward_mean":0.1,"kl":0.0,"policy_loss":-0.05,"value_loss":0.3}"#.into(),
            r#"{"stage":"ppo","step":2,"reward_mean":0.3,"kl":0.02,"policy_loss":-0.04,"value_loss":0.2}"#.into(),
            r#"{"stage":"ppo","step":3,"reward_mean":0.4,"kl":0.05,"policy_loss":-0.03,"value_loss":0.1}"#.into(),
        ]
    }

    #[test]
    fn series_group_by_stage_and_key() {
        let recs = parse_metrics(&lines());
        assert_eq!(recs.len(), 5);
        let loss = series(&recs, PLOTS[2].keys);
        let labels: Vec<&str> = loss.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["sft loss", "ppo policy_loss", "ppo value_loss"]);
        assert_eq!(loss[0].points, [(1.0, 2.0), (2.0, 1.5)]);
        let reward = series(&recs, &["reward_mean"]);
        assert_eq!(reward.len(), 1);
        assert_eq!(reward[0].points.len(), 3);
        // No stage, no step: the key is the label, the position the x.
        let recs = parse_metrics(&[r#"{"kl":1.0}"#.into(), r#"{"kl":2.0}"#.into()]);
        assert_eq!(series(&recs, &["kl"]), [Series { label: "kl".into(), points: vec![(1.0, 1.0), (2.0, 2.0)] }]);
    }

    #[test]
    fn bounds_are_never_empty() {
        let one = [Series { label: "a".into(), points: vec![(5.0, 0.0)] }];
        let (x, y) = bounds(&one);
        assert!(x.end > x.start && y.end > y.start);
        let (x, y) = bounds(&[]);
        assert!(x.end > x.start && y.end > y.start);
    }

    #[test]
    fn writes_png_plots_for_metrics_present() {
        let dir = tempfile::tempdir().unwrap();
        let (written, skipped) = write_plots(&lines(), dir.path()).unwrap();
        assert_eq!(written.len(), 3);
        assert_eq!(skipped, ["dpo_rewards.png"], "a PPO job has no DPO rewards");
        for p in &written {
            let bytes = std::fs::read(p).unwrap();
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", p.display());
            assert!(bytes.len() > 5_000, "{} looks empty ({} bytes)", p.display(), bytes.len());
        }
        // An SFT job has no reward or KL: only loss.png, the others named as skipped.
        let dir = tempfile::tempdir().unwrap();
        let (written, skipped) = write_plots(&lines()[..2], dir.path()).unwrap();
        assert_eq!(written, [dir.path().join("loss.png")]);
        assert_eq!(skipped, ["reward.png", "kl.png", "dpo_rewards.png"]);
        // A DPO job: its loss and implicit rewards.
        let dpo: Vec<String> = (1..=3)
            .map(|k| {
                format!(
                    r#"{{"stage":"dpo","step":{k},"loss":0.69,"rewards_chosen":{c},"rewards_rejected":-0.1,"rewards_margins":{m}}}"#,
                    c = 0.1 * k as f64,
                    m = 0.1 * k as f64 + 0.1
                )
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let (written, _) = write_plots(&dpo, dir.path()).unwrap();
        assert_eq!(written, [dir.path().join("loss.png"), dir.path().join("dpo_rewards.png")]);
    }

    #[test]
    fn single_point_and_flat_series_draw() {
        let dir = tempfile::tempdir().unwrap();
        let s = [Series { label: "flat".into(), points: vec![(1.0, 0.0)] }];
        draw_chart(&dir.path().join("one.png"), "one", "y", &s).unwrap();
        assert!(dir.path().join("one.png").exists());
    }
}
