//! deploy/slurm/rlhfd.sbatch under a real Slurm: scripts/slurm-local.sh
//! starts a private one with two nodes (Debian's slurm-wlm + munge,
//! installed when missing; a slurmd per node, each with its own port and
//! spool, on this machine; config and state under a temp dir), and
//!  1. `sbatch --nodes=2 --ntasks=3` runs examples/pipeline.toml to success:
//!     the coordinator a task on the first node, two CPU workers a step over
//!     both, connected over TLS with a CA the script made (as with several
//!     hosts); the job's [placement] (written for 4 workers) fitted to the
//!     2, the report in the output file, COMPLETED in `sacct -c`, and no
//!     process left;
//!  2. on one node (loopback) with RLHF_PLACEMENT=exact, the same job fails
//!     at once with the reason, and the Slurm job FAILED, instead of waiting
//!     out the allocation.
//!
//! It skips, saying so, only where Slurm is missing and apt-get is not there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rlhf_tests::*;

struct Slurm {
    dir: PathBuf,
    conf: PathBuf,
}

impl Slurm {
    /// None (after saying why) where Slurm cannot be had here.
    fn up(dir: &Path) -> Option<Self> {
        let out = Command::new(workspace_root().join("scripts/slurm-local.sh"))
            .arg("up")
            .args([dir.as_os_str(), "4".as_ref(), "2".as_ref()])
            .output()
            .expect("scripts/slurm-local.sh");
        if out.status.code() == Some(3) {
            eprintln!("SKIPPED: no Slurm here: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        assert!(out.status.success(), "slurm-local.sh up: {}", String::from_utf8_lossy(&out.stderr));
        Some(Slurm { dir: dir.to_path_buf(), conf: dir.join("slurm.conf") })
    }

    fn run(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new(cmd).args(args).env("SLURM_CONF", &self.conf).output().unwrap_or_else(|e| panic!("{cmd}: {e}"))
    }

    fn text(&self, cmd: &str, args: &[&str]) -> String {
        let out = self.run(cmd, args);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// `sbatch` of rlhfd.sbatch from `cwd` with `env`: the Slurm job id.
    fn sbatch(&self, cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> String {
        let script = workspace_root().join("deploy/slurm/rlhfd.sbatch");
        let job = workspace_root().join("examples/pipeline.toml");
        let out = Command::new("sbatch")
            .arg("--parsable")
            .args(args)
            .arg(&script)
            .arg(&job)
            .current_dir(cwd)
            .env("SLURM_CONF", &self.conf)
            .env("RLHF_BIN", bin("rlhfctl").parent().unwrap())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "sbatch: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().to_string()
    }

    /// Polls until job `id` leaves the queue; returns the squeue lines (jobs
    /// and steps) seen while its coordinator and worker steps both ran.
    fn wait(&self, id: &str, limit: Duration) -> String {
        let t = Instant::now();
        let mut seen = String::new();
        loop {
            let jobs = self.text("squeue", &["-j", id, "-h"]);
            if !jobs.contains(id) {
                return seen;
            }
            if seen.is_empty() {
                let steps = self.text("squeue", &["-s", "-j", id]);
                if steps.contains("rlhfd-co") && steps.contains("rlhfd-wo") {
                    seen = self.text("squeue", &["-j", id]) + &steps;
                }
            }
            assert!(t.elapsed() < limit, "Slurm job {id} still queued or running after {limit:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The job's line in `sacct -c` (the completion log).
    fn sacct(&self, id: &str) -> String {
        let all = self.text("sacct", &["-c", "-j", id]);
        let line = all.lines().find(|l| l.split_whitespace().next() == Some(id));
        format!("{}\n{}", all.lines().take(2).collect::<Vec<_>>().join("\n"), line.unwrap_or_else(|| panic!("{all}")))
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/slurm-local.sh")).arg("down").arg(&self.dir).status();
    }
}

/// Processes whose command line names `needle` (the job's data dir).
fn processes_naming(needle: &Path) -> Vec<String> {
    let out = Command::new("pgrep").args(["-a", "-f", &needle.display().to_string()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

#[test]
fn rlhfd_sbatch_runs_the_pipeline_under_slurm_and_fails_fast_when_placement_cannot_be_met() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(slurm) = Slurm::up(&tmp.path().join("slurm")) else { return };
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out_file = |id: &str| std::fs::read_to_string(work.join(format!("rlhfd-{id}.out"))).unwrap_or_default();
    let tasks =
        |nodes: &'static str| ["--gres=none", nodes, "--ntasks=3", "--cpus-per-task=1", "--output=rlhfd-%j.out"];

    // 1. The pipeline on two nodes, fitted to the allocation's two workers.
    let t = Instant::now();
    let id = slurm.sbatch(&work, &[], &tasks("--nodes=2"));
    let squeue = slurm.wait(&id, Duration::from_secs(600));
    let took = t.elapsed();
    let out = out_file(&id);
    let sacct = slurm.sacct(&id);
    eprintln!("--- squeue while it ran\n{squeue}--- sacct -c\n{sacct}\n--- rlhfd-{id}.out\n{out}--- {took:.1?}");
    let step = |name: &str| squeue.lines().find(|l| l.contains(name)).unwrap_or_default().to_string();
    assert!(step("rlhfd-co").ends_with(" node1"), "{squeue}");
    assert!(step("rlhfd-wo").ends_with(" node[1-2]"), "the workers' step is not on both nodes: {squeue}");
    assert!(sacct.contains("COMPLETED"), "{sacct}\n{out}");
    assert!(out.contains("no GPU allocated; 2 CPU workers"), "{out}");
    assert!(out.contains("coordinator at https://"), "several nodes, yet no TLS: {out}");
    for name in ["cpu-0", "cpu-1"] {
        assert!(out.lines().any(|l| l.contains(name) && l.contains(" yes ")), "{name} not alive: {out}");
    }
    assert!(out.contains("fitted: placement.rollout[0]: \"cpu-2\" is not connected"), "{out}");
    assert!(out.contains("the trainer generates"), "{out}");
    assert!(out.contains("succeeded") && out.contains("## Accuracy, choice mode"), "{out}");
    let data_dir = work.join(format!("rlhfd-{id}"));
    let coord = std::fs::read_to_string(data_dir.join("logs/coordinator.log")).unwrap();
    assert!(coord.contains("0.0.0.0"), "not listening beyond loopback: {coord}");
    let cpu1 = std::fs::read_to_string(data_dir.join("logs/cpu-1.log")).unwrap();
    assert!(cpu1.contains("hosting reward and critic roles"), "{cpu1}");
    let left = processes_naming(&data_dir);
    assert!(left.is_empty(), "left running: {left:?}");

    // 2. One node, placement as written: fails at once with the reason.
    let t = Instant::now();
    let id = slurm.sbatch(&work, &[("RLHF_PLACEMENT", "exact")], &tasks("--nodes=1"));
    slurm.wait(&id, Duration::from_secs(120));
    let took = t.elapsed();
    let out = out_file(&id);
    let sacct = slurm.sacct(&id);
    eprintln!("--- sacct -c\n{sacct}\n--- rlhfd-{id}.out\n{out}--- {took:.1?}");
    assert!(sacct.contains("FAILED"), "{sacct}\n{out}");
    assert!(out.contains("coordinator at http://127.0.0.1:"), "{out}");
    assert!(out.contains("placement cannot be met by this cluster"), "{out}");
    assert!(out.contains("rollout[0] on \"cpu-2\""), "{out}");
    assert!(took < Duration::from_secs(60), "failing took {took:?}");
}
