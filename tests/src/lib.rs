//! Helpers for end-to-end tests: start the real binaries in a temp dir on
//! loopback ports, talk to them with the generated tonic client, and stop
//! them (kill -9 on request).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_proto::auth::{Bearer, JobClient};
use rlhf_proto::job_service_client::JobServiceClient;
use rlhf_proto::*;

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Path of a binary built in the same target dir as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-bin> -> target/<profile>/<name>
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target profile dir");
    profile_dir.join(name)
}

/// The worker's checked-in fixtures.
pub fn fixtures() -> PathBuf {
    workspace_root().join("worker/tests/fixtures")
}

/// A command whose process dies with the test (PR_SET_PDEATHSIG), so a
/// crashed test never leaves daemons behind.
pub fn command(path: PathBuf) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(path);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A coordinator and its workers, killed on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub coordinator: Option<Child>,
    pub workers: Vec<Child>,
    pub lease_ms: u64,
    /// Extra coordinator flags.
    pub coordinator_args: Vec<String>,
}

impl Cluster {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts a coordinator (lease `lease_ms`) and `workers` CPU workers.
    pub fn start(workers: usize, lease_ms: u64) -> Self {
        Self::start_with(workers, lease_ms, |_| Vec::new())
    }

    /// [`start`](Self::start) with extra coordinator flags, made from the
    /// cluster's temp dir.
    pub fn start_with(workers: usize, lease_ms: u64, args: impl FnOnce(&Path) -> Vec<String>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let coordinator_args = args(dir.path());
        let mut c =
            Cluster { dir, port: free_port(), coordinator: None, workers: Vec::new(), lease_ms, coordinator_args };
        c.start_coordinator();
        for i in 0..workers {
            c.add_worker(&format!("cpu-{i}"));
        }
        c
    }

    fn log(&self, name: &str) -> Stdio {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file");
        Stdio::from(f)
    }

    pub fn start_coordinator(&mut self) {
        let child = command(bin("rlhf-coordinator"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--data-dir"])
            .arg(self.data_dir())
            .args(["--lease-ms", &self.lease_ms.to_string()])
            .args(&self.coordinator_args)
            .stdout(self.log("coordinator"))
            .stderr(self.log("coordinator"))
            .spawn()
            .expect("start coordinator");
        self.coordinator = Some(child);
    }

    pub fn add_worker(&mut self, name: &str) {
        let child = command(bin("rlhf-worker"))
            .args(["serve", "--coordinator", &self.url(), "--device", "cpu", "--name", name, "--heartbeat-ms", "200"])
            .arg("--token-file")
            .arg(self.data_dir().join("worker.token"))
            .env("RLHF_QUIET", "1")
            .env("RLHF_THREADS", "1")
            .stdout(self.log(name))
            .stderr(self.log(name))
            .spawn()
            .expect("start worker");
        self.workers.push(child);
    }

    /// `kill -9` the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                out +=
                    &format!("--- {}\n{}\n", e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    /// The admin token the coordinator made in its data dir.
    pub fn admin_token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir().join("admin.token")).ok().map(|t| t.trim().to_string())
    }

    /// A connected client with the admin token, retrying until the
    /// coordinator answers.
    pub async fn client(&self) -> JobClient {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(token) = self.admin_token() {
                if let Ok(c) = self.client_with(Bearer::new(&token).expect("token")).await {
                    return c;
                }
            }
            assert!(Instant::now() < deadline, "coordinator did not come up:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client presenting `bearer` (no retry).
    pub async fn client_with(&self, bearer: Bearer) -> Result<JobClient, tonic::transport::Error> {
        let ch = tonic::transport::Endpoint::from_shared(self.url()).expect("url").connect().await?;
        Ok(JobServiceClient::with_interceptor(ch, bearer))
    }

    /// Waits until `n` live workers are registered.
    pub async fn wait_workers(&self, n: usize) {
        let mut c = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let w = c.list_workers(ListWorkersRequest {}).await.map(|r| r.into_inner().workers).unwrap_or_default();
            if w.iter().filter(|w| w.alive).count() >= n {
                return;
            }
            assert!(Instant::now() < deadline, "workers did not register:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        self.kill_coordinator();
    }
}

/// The name of a proto state number ("unknown" for one this build lacks).
pub fn state_name(s: i32) -> &'static str {
    JobState::try_from(s).unwrap_or(JobState::Unspecified).name()
}

/// Polls a job until `pred` holds or `timeout` passes; returns the last view.
pub async fn wait_job(c: &mut JobClient, id: &str, timeout: Duration, pred: impl Fn(&Job) -> bool) -> Job {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = c.get_job(GetJobRequest { job_id: id.to_string() }).await {
            if let Some(j) = r.into_inner().job {
                if pred(&j) || Instant::now() > deadline {
                    return j;
                }
            }
        } else if Instant::now() > deadline {
            panic!("job {id} unreachable");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn is_terminal(j: &Job) -> bool {
    matches!(state_name(j.state), "succeeded" | "failed" | "cancelled")
}

/// An SFT job on the tiny fixture model with absolute paths.
pub fn sft_job(steps: usize, checkpoint_every: usize) -> String {
    let f = fixtures();
    let p = |s: &str| f.join(s).display().to_string();
    format!(
        r#"version = 1
kind = "sft"
name = "sft-e2e"
seed = 3
[model]
path = "{}"
max_length = 256
[peft]
method = "lora"
r = 8
target_modules = ["all-linear"]
[data]
task = "eprstmt"
train = "{}"
eval = "{}"
[train]
max_steps = {steps}
batch_size = 8
lr = 3e-3
[checkpoint]
every = {checkpoint_every}
keep = 2
"#,
        p("tiny-llama"),
        p("fewclue/eprstmt/train.json"),
        p("fewclue/eprstmt/dev.json")
    )
}

pub fn read_metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Submits a job file's text; returns the job id.
pub async fn submit_spec(c: &mut JobClient, spec: String) -> String {
    c.submit_job(rlhf_proto::SubmitJobRequest { spec_toml: spec, request_id: String::new() })
        .await
        .expect("submit")
        .into_inner()
        .job_id
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (Debian's openssl package)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a server certificate for localhost / 127.0.0.1, made with
/// openssl in `dir`: ca.pem, server.pem, server.key.
pub fn tls_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=rlhfd test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}
