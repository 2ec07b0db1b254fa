//! TLS: a coordinator beyond loopback must serve TLS; with a certificate
//! (made here by openssl, a CA and a server cert for localhost) a worker and
//! rlhfctl reach it over https with the CA and their tokens, a plain client
//! is refused, and 200 concurrent GetJob calls cost what this test prints
//! against a plain coordinator.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_proto::auth::Bearer;
use rlhf_proto::job_service_client::JobServiceClient;
use rlhf_proto::*;
use rlhf_tests::*;

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn two_hundred_get_jobs(url: &str, ca: Option<&Path>, token: &str, job: &str) -> f64 {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (url, ca, token, job) = (url.to_string(), ca.map(Path::to_path_buf), token.to_string(), job.to_string());
        tasks.push(tokio::spawn(async move {
            let ch = rlhf_proto::connect::connect(&url, ca.as_deref()).await.unwrap();
            let mut c = JobServiceClient::with_interceptor(ch, Bearer::new(&token).unwrap());
            c.get_job(GetJobRequest { job_id: job }).await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    t.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_coordinator_serves_workers_and_clients_with_the_ca_and_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    tls_certificates(d);
    let data = d.join("data");

    // Beyond loopback without TLS: refused at start.
    let out = Command::new(bin("rlhf-coordinator"))
        .args(["--listen", &format!("0.0.0.0:{}", port()), "--data-dir"])
        .arg(d.join("plain"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("beyond loopback the coordinator serves only TLS"), "{err}");

    let p = port();
    let url = format!("https://localhost:{p}");
    let mut coordinator = Command::new(bin("rlhf-coordinator"))
        .args(["--listen", &format!("127.0.0.1:{p}"), "--data-dir"])
        .arg(&data)
        .arg("--tls-cert")
        .arg(d.join("server.pem"))
        .arg("--tls-key")
        .arg(d.join("server.key"))
        .stderr(Stdio::from(std::fs::File::create(d.join("coordinator.log")).unwrap()))
        .spawn()
        .unwrap();
    let mut worker = Command::new(bin("rlhf-worker"))
        .args(["serve", "--coordinator", &url, "--device", "cpu", "--name", "cpu-0", "--heartbeat-ms", "200"])
        .arg("--tls-ca")
        .arg(d.join("ca.pem"))
        .arg("--token-file")
        .arg(data.join("worker.token"))
        .env("RLHF_QUIET", "1")
        .env("RLHF_THREADS", "1")
        .stderr(Stdio::from(std::fs::File::create(d.join("worker.log")).unwrap()))
        .spawn()
        .unwrap();
    let logs =
        || ["coordinator.log", "worker.log"].map(|f| std::fs::read_to_string(d.join(f)).unwrap_or_default()).join("\n");

    let job_file = d.join("sft.toml");
    std::fs::write(&job_file, sft_job(5, 0)).unwrap();
    let ctl = |args: &[&str]| {
        Command::new(bin("rlhfctl"))
            .args(args)
            .env("RLHF_COORDINATOR", &url)
            .env("RLHF_TLS_CA", d.join("ca.pem"))
            .env("RLHF_DATA_DIR", &data)
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctl(&["workers", "--json"]).stdout.windows(13).any(|w| w == b"\"alive\": true") {
        assert!(Instant::now() < deadline, "the worker did not register over TLS:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sub = ctl(&["submit", job_file.to_str().unwrap(), "--wait"]);
    assert!(sub.status.success(), "{}\n{}", String::from_utf8_lossy(&sub.stderr), logs());
    let job = String::from_utf8_lossy(&sub.stdout).lines().last().unwrap().trim().to_string();

    // A plain-text client gets no answer from the TLS port.
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap().trim().to_string();
    let plain = rlhf_proto::connect::connect(&format!("http://127.0.0.1:{p}"), None).await;
    if let Ok(ch) = plain {
        let mut c = JobServiceClient::with_interceptor(ch, Bearer::new(&token).unwrap());
        assert!(c.get_job(GetJobRequest { job_id: job.clone() }).await.is_err());
    }

    // The cost of TLS + token: 200 concurrent clients (connect + GetJob).
    let ca = d.join("ca.pem");
    let tls_s = two_hundred_get_jobs(&url, Some(&ca), &token, &job).await;
    let cl = Cluster::start(0, 3000);
    let mut c = cl.client().await;
    let plain_job = submit_spec(&mut c, sft_job(5, 0)).await;
    let plain_s = two_hundred_get_jobs(&cl.url(), None, &cl.admin_token().unwrap(), &plain_job).await;
    eprintln!("200 concurrent clients (connect + GetJob): TLS + token {tls_s:.3} s, plain + token {plain_s:.3} s");
    assert!(tls_s < 20.0);
    let _ = worker.kill();
    let _ = coordinator.kill();
    let _ = (worker.wait(), coordinator.wait());
}
