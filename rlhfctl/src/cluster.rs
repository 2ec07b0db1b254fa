//! `rlhfctl up` / `down`: a local cluster — one coordinator plus one worker
//! per GPU (or N CPU workers) — run in the background from binaries that sit
//! next to `rlhfctl` (falling back to `$PATH`).
//!
//! Layout of the data directory (also the coordinator's `--data-dir`):
//! `cluster.json` (what `down` stops), `logs/<name>.log` (each process's
//! stdout and stderr, appended), and the coordinator's own `state.db` and
//! `jobs/`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::client::Client;
use super::render::fmt_utc;
use rlhf_common::now_ms;

pub const COORDINATOR_BIN: &str = "rlhf-coordinator";
pub const WORKER_BIN: &str = "rlhf-worker";
pub const CLUSTER_FILE: &str = "cluster.json";

/// `cluster.json`: what `up` started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub coordinator_url: String,
    pub listen: String,
    pub data_dir: PathBuf,
    pub started_at_ms: i64,
    pub processes: Vec<Proc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proc {
    /// `coordinator`, `cpu-0`, `gpu-1`, …
    pub name: String,
    /// `cpu`, `cuda:N`; empty for the coordinator.
    #[serde(default)]
    pub device: String,
    pub pid: u32,
    pub program: PathBuf,
    pub log: PathBuf,
}

pub use crate::local::default_data_dir;

/// The address a coordinator URL points at, for `up` to listen on when no
/// `--listen` is given (`http://localhost:50051` → `127.0.0.1:50051`).
pub fn listen_from_url(url: &str) -> Option<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    if let Ok(a) = authority.parse::<SocketAddr>() {
        return Some(a);
    }
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    (host == "localhost").then_some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
}

/// The URL that reaches a coordinator listening on `listen` from this
/// machine (a wildcard address is reached through loopback).
pub fn url_for_listen(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// The number of GPUs named by `CUDA_VISIBLE_DEVICES` (`None` when it does
/// not restrict anything). An empty value or `-1` hides every GPU.
pub fn parse_visible_devices(v: &str) -> Option<usize> {
    let v = v.trim();
    if v.is_empty() {
        return Some(0);
    }
    let ids: Vec<&str> = v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    // CUDA stops at the first invalid entry (e.g. -1).
    Some(ids.iter().take_while(|s| !s.starts_with('-')).count())
}

/// The GPUs that `nvidia-smi -L` lists (`GPU 0: NVIDIA H100 … (UUID: …)`).
pub fn parse_nvidia_smi(out: &str) -> usize {
    out.lines().filter(|l| l.trim_start().starts_with("GPU ")).count()
}

/// GPUs this process may use: `CUDA_VISIBLE_DEVICES` if set, else `nvidia-smi -L`, else 0.
pub fn count_gpus() -> usize {
    if let Some(v) = std::env::var_os("CUDA_VISIBLE_DEVICES") {
        if let Some(n) = parse_visible_devices(&v.to_string_lossy()) {
            return n;
        }
    }
    match Command::new("nvidia-smi").arg("-L").stdin(Stdio::null()).stderr(Stdio::null()).output() {
        Ok(o) if o.status.success() => parse_nvidia_smi(&String::from_utf8_lossy(&o.stdout)),
        Ok(_) | Err(_) => 0,
    }
}

/// The workers `up` starts: `N` CPU workers when asked, else one per GPU,
/// else a single CPU worker. Returns (name, device) pairs.
pub fn plan_workers(cpu_workers: Option<usize>, gpus: usize) -> Vec<(String, String)> {
    match cpu_workers {
        Some(n) => (0..n).map(|k| (format!("cpu-{k}"), "cpu".to_string())).collect(),
        None if gpus > 0 => (0..gpus).map(|k| (format!("gpu-{k}"), format!("cuda:{k}"))).collect(),
        None => vec![("cpu-0".to_string(), "cpu".to_string())],
    }
}

/// Torch threads for each of `workers` CPU workers: the cores shared out
/// (at least one each), unless `RLHF_THREADS` says otherwise.
fn cpu_threads(workers: usize) -> Option<usize> {
    if workers == 0 || std::env::var_os("RLHF_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some((cores / workers).max(1))
}

/// A daemon binary: next to this executable, else on `$PATH`.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate rlhfctl's own executable")?;
    let beside = exe.parent().map(|d| d.join(name));
    if let Some(p) = beside.as_ref().filter(|p| p.is_file()) {
        return Ok(p.clone());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let beside = beside.map_or_else(|| "next to rlhfctl".to_string(), |p| p.display().to_string());
    bail!("cannot find {name}: not at {beside} nor on $PATH (build it: cargo build --release -p {name})")
}

/// The last `n` lines of a log file (at most its last 64 KiB).
pub fn log_tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else { return format!("(no log at {})", path.display()) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether `pid` is a live (not zombie) process running `program`. Off
/// Linux, only liveness is checked.
pub fn is_running(pid: u32, program: &Path) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else { return false };
    if pid_t <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive =
        unsafe { libc::kill(pid_t, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !alive {
        return false;
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !proc_dir.exists() {
        return true;
    }
    if let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) {
        // `pid (comm) S …`: the state follows the last ')'.
        if stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])) {
            return false;
        }
    }
    match std::fs::read(proc_dir.join("cmdline")) {
        Ok(cmd) => {
            let argv0 = cmd.split(|b| *b == 0).next().unwrap_or_default();
            let argv0 = Path::new(std::str::from_utf8(argv0).unwrap_or_default());
            argv0.file_name().is_some() && argv0.file_name() == program.file_name()
        }
        Err(_) => true,
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        if p > 0 {
            // SAFETY: plain kill(2) on a pid we started and just checked.
            unsafe {
                libc::kill(p, sig);
            }
        }
    }
}

pub fn read_cluster_file(data_dir: &Path) -> Result<Option<ClusterFile>> {
    let path = data_dir.join(CLUSTER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            serde_json::from_str(&s).map(Some).with_context(|| format!("{} is not a cluster file", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

fn write_cluster_file(c: &ClusterFile) -> Result<()> {
    let path = c.data_dir.join(CLUSTER_FILE);
    let tmp = c.data_dir.join(format!("{CLUSTER_FILE}.tmp"));
    let text = serde_json::to_string_pretty(c)?;
    std::fs::write(&tmp, text + "\n").with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("failed to write {}", path.display()))
}

pub struct UpOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub cpu_workers: Option<usize>,
    pub timeout: Duration,
}

/// A process `up` started and still owns (so it can reap it on failure).
struct Started {
    proc: Proc,
    child: Child,
}

impl Started {
    fn check_alive(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(anyhow!(
                "{} exited during startup ({status}); last lines of {}:\n{}",
                self.proc.name,
                self.proc.log.display(),
                log_tail(&self.proc.log, 20)
            )),
            Ok(None) | Err(_) => Ok(()),
        }
    }
}

fn spawn(name: &str, device: &str, program: &Path, args: &[String], data_dir: &Path) -> Result<Started> {
    let log = data_dir.join("logs").join(format!("{name}.log"));
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("failed to open {}", log.display()))?;
    let _ =
        writeln!(f, "--- rlhfctl up {} at {} UTC: {} {}", name, fmt_utc(now_ms()), program.display(), args.join(" "));
    let err = f.try_clone().with_context(|| format!("failed to open {}", log.display()))?;
    let child = Command::new(program)
        .args(args)
        .current_dir(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(f))
        .stderr(Stdio::from(err))
        // Its own process group: a Ctrl-C in the shell that ran `up` does not reach it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("failed to start {}", program.display()))?;
    let proc = Proc {
        name: name.to_string(),
        device: device.to_string(),
        pid: child.id(),
        program: program.to_path_buf(),
        log,
    };
    Ok(Started { proc, child })
}

/// Stops processes `up` itself started (after a failed start).
fn stop_started(started: &mut [Started]) {
    for s in started.iter() {
        signal(s.proc.pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for s in started.iter_mut() {
        while Instant::now() < deadline && matches!(s.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(s.child.try_wait(), Ok(None)) {
            let _ = s.child.kill();
        }
        let _ = s.child.wait();
    }
}

/// Starts the cluster and waits for the coordinator and every worker.
pub async fn up(opts: UpOptions) -> Result<ClusterFile> {
    std::fs::create_dir_all(opts.data_dir.join("logs"))
        .with_context(|| format!("failed to create {}", opts.data_dir.display()))?;
    let data_dir =
        opts.data_dir.canonicalize().with_context(|| format!("failed to resolve {}", opts.data_dir.display()))?;
    if let Some(old) = read_cluster_file(&data_dir)? {
        if let Some(p) = old.processes.iter().find(|p| is_running(p.pid, &p.program)) {
            bail!(
                "a cluster started from {} is already running ({} pid {}, {}); stop it with `rlhfctl down --data-dir {}`",
                data_dir.display(),
                p.name,
                p.pid,
                old.coordinator_url,
                data_dir.display()
            );
        }
        let _ = std::fs::remove_file(data_dir.join(CLUSTER_FILE));
    }
    let url = url_for_listen(opts.listen);
    let probe = listen_from_url(&url).unwrap_or(opts.listen);
    if TcpStream::connect_timeout(&probe, Duration::from_millis(300)).is_ok() {
        bail!("{} is already in use (another coordinator?); pick another address with --listen", opts.listen);
    }
    let coordinator = find_binary(COORDINATOR_BIN)?;
    let worker = find_binary(WORKER_BIN)?;
    let plan = plan_workers(opts.cpu_workers, if opts.cpu_workers.is_some() { 0 } else { count_gpus() });

    let mut started: Vec<Started> = Vec::new();
    let mut cluster = ClusterFile {
        coordinator_url: url.clone(),
        listen: opts.listen.to_string(),
        data_dir: data_dir.clone(),
        started_at_ms: now_ms(),
        processes: Vec::new(),
    };
    let result = async {
        let args = vec![
            "--listen".to_string(),
            opts.listen.to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
        ];
        started.push(spawn("coordinator", "", &coordinator, &args, &data_dir)?);
        cluster.processes = started.iter().map(|s| s.proc.clone()).collect();
        write_cluster_file(&cluster)?;

        let deadline = Instant::now() + opts.timeout;
        let mut client = loop {
            started[0].check_alive()?;
            // The coordinator writes its admin token on start; this process uses it.
            if crate::local::TOKEN.get().is_none() && std::env::var_os("RLHF_TOKEN").is_none() {
                if let Ok(t) = std::fs::read_to_string(data_dir.join("admin.token")) {
                    let _ = crate::local::TOKEN.set(t.trim().to_string());
                }
            }
            if let Ok(mut c) = Client::connect(&url).await {
                if c.workers().await.is_ok() {
                    break c;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the coordinator did not answer at {url} within {}s; last lines of {}:\n{}",
                    opts.timeout.as_secs(),
                    started[0].proc.log.display(),
                    log_tail(&started[0].proc.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };

        let threads = cpu_threads(plan.iter().filter(|(_, d)| d == "cpu").count());
        for (name, device) in &plan {
            let mut args = vec![
                "serve".to_string(),
                "--coordinator".to_string(),
                url.clone(),
                "--device".to_string(),
                device.clone(),
                "--name".to_string(),
                name.clone(),
                "--token-file".to_string(),
                data_dir.join("worker.token").display().to_string(),
            ];
            if let (Some(n), "cpu") = (threads, device.as_str()) {
                args.extend(["--threads".to_string(), n.to_string()]);
            }
            started.push(spawn(name, device, &worker, &args, &data_dir)?);
        }
        cluster.processes = started.iter().map(|s| s.proc.clone()).collect();
        write_cluster_file(&cluster)?;

        loop {
            for s in started.iter_mut() {
                s.check_alive()?;
            }
            let workers = client.workers().await.unwrap_or_default();
            let missing: Vec<&str> = plan
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| !workers.iter().any(|w| w.alive && w.name == *n))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let tails: Vec<String> = started
                    .iter()
                    .filter(|s| missing.contains(&s.proc.name.as_str()))
                    .map(|s| format!("last lines of {}:\n{}", s.proc.log.display(), log_tail(&s.proc.log, 20)))
                    .collect();
                bail!(
                    "workers {} did not register within {}s\n{}",
                    missing.join(", "),
                    opts.timeout.as_secs(),
                    tails.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    match result {
        Ok(()) => Ok(cluster),
        Err(e) => {
            stop_started(&mut started);
            let _ = std::fs::remove_file(data_dir.join(CLUSTER_FILE));
            Err(e.context("rlhfctl up failed; stopped what it had started"))
        }
    }
}

/// How one process of the cluster ended under `down`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It had already exited.
    NotRunning,
    /// It exited after SIGTERM.
    Terminated,
    /// It outlived the grace period and got SIGKILL.
    Killed,
}

/// SIGTERM to every listed process still running, SIGKILL after `grace`.
fn stop_all(procs: &[&Proc], grace: Duration) -> Vec<Stopped> {
    let running: Vec<bool> = procs.iter().map(|p| is_running(p.pid, &p.program)).collect();
    for (p, r) in procs.iter().zip(&running) {
        if *r {
            signal(p.pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && procs.iter().any(|p| is_running(p.pid, &p.program)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    procs
        .iter()
        .zip(running)
        .map(|(p, was)| {
            if !was {
                Stopped::NotRunning
            } else if is_running(p.pid, &p.program) {
                signal(p.pid, libc::SIGKILL);
                Stopped::Killed
            } else {
                Stopped::Terminated
            }
        })
        .collect()
}

/// Stops the cluster of `data_dir`: workers first, then the coordinator
/// (so no job is rescheduled onto a dying worker), and removes `cluster.json`.
/// `Ok(None)`: there was no cluster file.
pub fn down(data_dir: &Path, grace: Duration) -> Result<Option<Vec<(Proc, Stopped)>>> {
    let Some(cluster) = read_cluster_file(data_dir)? else { return Ok(None) };
    let (coord, workers): (Vec<&Proc>, Vec<&Proc>) = cluster.processes.iter().partition(|p| p.device.is_empty());
    let mut out = Vec::new();
    for group in [workers, coord] {
        let stopped = stop_all(&group, grace);
        out.extend(group.into_iter().cloned().zip(stopped));
    }
    let path = data_dir.join(CLUSTER_FILE);
    std::fs::remove_file(&path).with_context(|| format!("failed to remove {}", path.display()))?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_plans() {
        assert_eq!(plan_workers(Some(2), 8), [("cpu-0".into(), "cpu".into()), ("cpu-1".into(), "cpu".into())]);
        assert_eq!(plan_workers(None, 2), [("gpu-0".into(), "cuda:0".into()), ("gpu-1".into(), "cuda:1".into())]);
        assert_eq!(plan_workers(None, 0), [("cpu-0".into(), "cpu".into())]);
        assert!(plan_workers(Some(0), 0).is_empty());
    }

    #[test]
    fn gpu_counting() {
        let smi = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n  MIG 1g.10gb Device 0: (UUID: MIG-x)\n";
        assert_eq!(parse_nvidia_smi(smi), 2);
        assert_eq!(parse_nvidia_smi(""), 0);
        assert_eq!(parse_visible_devices("0,2"), Some(2));
        assert_eq!(parse_visible_devices(""), Some(0));
        assert_eq!(parse_visible_devices("-1"), Some(0));
        assert_eq!(parse_visible_devices("1,-1,2"), Some(1));
    }

    #[test]
    fn addresses() {
        assert_eq!(url_for_listen("0.0.0.0:50051".parse().unwrap()), "http://127.0.0.1:50051");
        assert_eq!(url_for_listen("[::]:7".parse().unwrap()), "http://[::1]:7");
        assert_eq!(url_for_listen("10.0.0.5:9".parse().unwrap()), "http://10.0.0.5:9");
        assert_eq!(listen_from_url("http://127.0.0.1:50099"), Some("127.0.0.1:50099".parse().unwrap()));
        assert_eq!(listen_from_url("http://localhost:1234/"), Some("127.0.0.1:1234".parse().unwrap()));
        assert_eq!(listen_from_url("https://coord.example:50051"), None);
    }

    #[test]
    fn log_tails_and_liveness() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        std::fs::write(&log, "a\nb\nc\n").unwrap();
        assert_eq!(log_tail(&log, 2), "b\nc");
        assert!(log_tail(&dir.path().join("none.log"), 2).contains("no log"));
        let me = std::env::current_exe().unwrap();
        assert!(is_running(std::process::id(), &me));
        assert!(!is_running(std::process::id(), Path::new("/bin/not-this-program")));
        assert!(!is_running(0, &me));
    }

    #[test]
    fn down_without_cluster_file_is_a_no_op_and_stops_processes() {
        let dir = tempfile::tempdir().unwrap();
        assert!(down(dir.path(), Duration::from_secs(1)).unwrap().is_none());
        // A real child listed as a worker, and a pid that is no process.
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        // Until the child has exec'd, /proc shows the test binary's command line.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default().starts_with(b"sleep")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let reaper = std::thread::spawn(move || {
            let mut child = child;
            child.wait()
        });
        let proc = |name: &str, pid: u32| Proc {
            name: name.into(),
            device: "cpu".into(),
            pid,
            program: "sleep".into(),
            log: "x".into(),
        };
        let cluster = ClusterFile {
            coordinator_url: "http://127.0.0.1:1".into(),
            listen: "127.0.0.1:1".into(),
            data_dir: dir.path().to_path_buf(),
            started_at_ms: 0,
            processes: vec![proc("cpu-0", pid), proc("cpu-1", u32::MAX / 2)],
        };
        write_cluster_file(&cluster).unwrap();
        assert_eq!(read_cluster_file(dir.path()).unwrap().as_ref(), Some(&cluster));
        let r = down(dir.path(), Duration::from_secs(5)).unwrap().unwrap();
        let how: Vec<&Stopped> = r.iter().map(|(_, s)| s).collect();
        assert_eq!(how, [&Stopped::Terminated, &Stopped::NotRunning]);
        assert!(reaper.join().unwrap().is_ok());
        assert!(!dir.path().join(CLUSTER_FILE).exists());
    }
}
