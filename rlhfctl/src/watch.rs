//! `rlhfctl watch` (and `submit --wait`): follows `WatchJob` until the job
//! ends. On a terminal: an indicatif bar per stage (stage, step/total,
//! reward, KL, loss, ETA). Otherwise: plain lines, at most one every two
//! seconds per stage plus every state or stage change. A dropped stream
//! (coordinator restarting) is retried for a minute.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rlhf_proto::{Job, JobState};
use tonic::Code;

use super::client::Client;
use super::render::{job_kind, job_state, metrics_summary, progress_metrics, progress_summary};

/// Where plain lines and the final line go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    Stderr,
}

const RECONNECT_FOR: Duration = Duration::from_secs(60);
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// Whether a failed watch call is worth retrying (the coordinator went
/// away) rather than final (no such job).
fn retryable(code: Code) -> bool {
    match code {
        Code::Unavailable
        | Code::Unknown
        | Code::Cancelled
        | Code::Aborted
        | Code::Internal
        | Code::DeadlineExceeded => true,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::DataLoss
        | Code::Unauthenticated => false,
    }
}

/// Follows job `id` until it is terminal and returns its last snapshot.
pub async fn watch(client: &mut Client, id: &str, sink: Sink) -> Result<Job> {
    let mut view = View::new(std::io::stderr().is_terminal(), sink);
    let mut lost_since: Option<Instant> = None;
    loop {
        match client.watch(id).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        let Some(job) = resp.job else { continue };
                        lost_since = None;
                        view.update(&job);
                        if job_state(&job).is_terminal() {
                            view.finish(&job);
                            return Ok(job);
                        }
                    }
                    Ok(None) => break,
                    Err(s) if retryable(s.code()) => break,
                    Err(s) => {
                        view.abandon();
                        return Err(client.error(s));
                    }
                }
            },
            Err(s) if retryable(s.code()) => {}
            Err(s) => {
                view.abandon();
                return Err(client.error(s));
            }
        }
        let since = *lost_since.get_or_insert_with(|| {
            view.note("lost the coordinator's stream; reconnecting");
            Instant::now()
        });
        if since.elapsed() > RECONNECT_FOR {
            view.abandon();
            return Err(anyhow!(
                "lost the coordinator at {} while watching job {id} and could not reconnect for {}s",
                client.url(),
                RECONNECT_FOR.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What was last shown, to decide whether a snapshot is news.
#[derive(Clone, Debug, Default, PartialEq)]
struct Shown {
    state: &'static str,
    stage: String,
    step: u64,
}

struct View {
    tty: bool,
    sink: Sink,
    /// One bar for the whole watch (terminal only): a spinner while there is
    /// no step count, a bar per stage otherwise; a finished stage leaves a
    /// summary line above it.
    bar: Option<ProgressBar>,
    /// The stage the bar counts, its last summary and when it started.
    stage: Option<(String, String, Instant)>,
    shown: Option<Shown>,
    last_plain: Option<Instant>,
    start: Instant,
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>10.bold} [{bar:30.cyan/blue}] {pos}/{len} eta {eta:<4} {wide_msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} ({elapsed})").unwrap_or_else(|_| ProgressStyle::default_spinner())
}

impl View {
    fn new(tty: bool, sink: Sink) -> Self {
        Self { tty, sink, bar: None, stage: None, shown: None, last_plain: None, start: Instant::now() }
    }

    fn emit(&self, line: &str) {
        match (&self.bar, self.sink) {
            (Some(bar), Sink::Stderr) => bar.suspend(|| eprintln!("{line}")),
            (Some(bar), Sink::Stdout) => bar.suspend(|| println!("{line}")),
            (None, Sink::Stderr) => eprintln!("{line}"),
            (None, Sink::Stdout) => println!("{line}"),
        }
    }

    fn note(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }

    fn update(&mut self, job: &Job) {
        let state = job_state(job);
        let p = job.progress.as_ref().filter(|p| !p.stage.is_empty() || p.total > 0);
        let now = Shown {
            state: state.name(),
            stage: p.map(|p| p.stage.clone()).unwrap_or_default(),
            step: p.map_or(0, |p| p.step),
        };
        if self.tty {
            self.update_bar(job, state);
        } else {
            let prev = self.shown.clone();
            let changed = prev.as_ref().is_none_or(|s| s.state != now.state || s.stage != now.stage);
            let stepped = prev.as_ref().is_some_and(|s| s.step != now.step);
            let due = self.last_plain.is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
            let last_step = p.is_some_and(|p| p.total > 0 && p.step >= p.total);
            if changed || (stepped && (due || last_step)) {
                let mut line = format!("{:>7.1}s  {:<9}", self.start.elapsed().as_secs_f64(), now.state);
                let progress = progress_summary(job.progress.as_ref());
                if !progress.is_empty() {
                    line.push_str("  ");
                    line.push_str(&progress);
                }
                self.emit(line.trim_end());
                self.last_plain = Some(Instant::now());
            }
        }
        self.shown = Some(now);
    }

    fn bar(&mut self) -> &ProgressBar {
        self.bar.get_or_insert_with(|| ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()))
    }

    /// Prints the finished stage's summary above the bar.
    fn close_stage(&mut self) {
        if let (Some((_, summary, started)), Some(bar)) = (self.stage.take(), &self.bar) {
            bar.println(format!("{summary} ({:.1}s)", started.elapsed().as_secs_f64()));
        }
    }

    fn update_bar(&mut self, job: &Job, state: JobState) {
        let progress = job.progress.as_ref().filter(|p| p.total > 0);
        match (state, progress) {
            (JobState::Running, Some(p)) => {
                let label = if p.stage.is_empty() { job_kind(job) } else { p.stage.clone() };
                if self.stage.as_ref().is_none_or(|(s, _, _)| *s != label) {
                    self.close_stage();
                    let bar = self.bar();
                    bar.disable_steady_tick();
                    bar.set_message("");
                    bar.set_length(p.total);
                    bar.set_position(p.step.min(p.total));
                    bar.set_prefix(label.clone());
                    bar.set_style(bar_style());
                    // Steps done before we started watching say nothing about the rate.
                    bar.reset_eta();
                    self.stage = Some((label.clone(), String::new(), Instant::now()));
                }
                let mut msg = progress_metrics(p).map(|m| metrics_summary(&m)).unwrap_or_default();
                if job.attempts > 1 {
                    msg.push_str(&format!(" (attempt {})", job.attempts));
                }
                let msg = msg.trim().to_string();
                let bar = self.bar();
                bar.set_length(p.total);
                bar.set_position(p.step.min(p.total));
                bar.set_message(msg.clone());
                if let Some((_, summary, _)) = &mut self.stage {
                    *summary = format!("{label:>10} {}/{} {msg}", p.step.min(p.total), p.total);
                }
            }
            (JobState::Queued | JobState::Running | JobState::Unspecified, _) => {
                let msg = match state {
                    JobState::Queued if job.attempts > 0 => "queued again (its worker was lost); waiting for a worker",
                    JobState::Queued => "queued; waiting for a worker",
                    _ => "running; waiting for the first step",
                };
                let was_spinner = self.bar.is_some() && self.stage.is_none();
                self.close_stage();
                let bar = self.bar();
                if !was_spinner {
                    bar.set_style(spinner_style());
                    bar.unset_length();
                    bar.enable_steady_tick(Duration::from_millis(120));
                }
                bar.set_message(msg);
            }
            (JobState::Succeeded | JobState::Failed | JobState::Cancelled, _) => {}
        }
    }

    fn finish(&mut self, job: &Job) {
        let state = job_state(job);
        if self.tty {
            self.close_stage();
            if let Some(bar) = self.bar.take() {
                bar.finish_and_clear();
            }
        }
        let line = match state {
            JobState::Failed | JobState::Cancelled if !job.reason.is_empty() => {
                format!("job {} {}: {}", job.job_id, state.name(), job.reason)
            }
            _ => format!("job {} {}", job.job_id, state.name()),
        };
        self.emit(&line);
    }

    fn abandon(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transport_failures_are_retried() {
        assert!(retryable(Code::Unavailable));
        assert!(retryable(Code::Unknown));
        assert!(!retryable(Code::NotFound));
        assert!(!retryable(Code::InvalidArgument));
    }
}
