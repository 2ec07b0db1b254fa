//! grpcurl, with no .proto files, against a real coordinator: reflection
//! lists the services, health answers, a job is submitted with `-d`, and a
//! bad job is InvalidArgument naming the field. scripts/test.sh installs
//! grpcurl and sets RLHF_GRPCURL.

use std::path::PathBuf;
use std::process::Command;

use rlhf_tests::*;

fn grpcurl() -> PathBuf {
    let p = std::env::var_os("RLHF_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/rlhfd/bin/grpcurl"));
    assert!(p.exists(), "grpcurl not found at {} (scripts/test.sh installs it)", p.display());
    p
}

fn call(addr: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(grpcurl())
        .arg("-plaintext")
        .args(args.iter().take(args.len() - 1))
        .arg(addr)
        .arg(args[args.len() - 1])
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_submits_and_gets_named_errors() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let addr = format!("127.0.0.1:{}", cl.port);
    let out = Command::new(grpcurl()).args(["-plaintext", &addr, "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for svc in ["rlhf.v1.JobService", "rlhf.v1.WorkerService", "grpc.health.v1.Health"] {
        assert!(list.contains(svc), "{list}");
    }
    let (ok, health) = call(&addr, &["grpc.health.v1.Health/Check"]);
    assert!(ok && health.contains("SERVING"), "{health}");
    let body = serde_json::json!({ "spec_toml": sft_job(5, 0), "request_id": "grpcurl-1" }).to_string();
    let (ok, sub) = call(&addr, &["-d", &body, "rlhf.v1.JobService/SubmitJob"]);
    assert!(ok && sub.contains("jobId"), "{sub}");
    let (ok, err) = call(
        &addr,
        &[
            "-d",
            r#"{"spec_toml": "version = 1\nkind = \"sft\"\n[model]\npath = \"m\"\ndtype = \"f64\"\n"}"#,
            "rlhf.v1.JobService/SubmitJob",
        ],
    );
    assert!(!ok && err.contains("InvalidArgument"), "{err}");
    let (_, jobs) = call(&addr, &["rlhf.v1.JobService/ListJobs"]);
    assert!(jobs.contains("grpcurl") || jobs.contains("sft-e2e"), "{jobs}");
}
