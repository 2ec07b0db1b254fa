//! grpcurl, with no .proto files, against a real coordinator: without the
//! token every call is Unauthenticated; with `-H 'authorization: Bearer …'`
//! reflection lists the services, health answers, a job is submitted with
//! `-d`, and a bad job is InvalidArgument naming the field. scripts/test.sh
//! installs grpcurl and sets RLHF_GRPCURL.

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

fn call(addr: &str, header: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(grpcurl())
        .arg("-plaintext")
        .args(["-H", header])
        .args(args.iter().take(args.len() - 1))
        .arg(addr)
        .arg(args[args.len() - 1])
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The proto sources, for calls that cannot use reflection (it needs the token too).
fn proto_dir() -> String {
    std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"))
        .join("../proto")
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_submits_and_gets_named_errors() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let addr = format!("127.0.0.1:{}", cl.port);
    let h = format!("authorization: Bearer {}", cl.admin_token().unwrap());
    let body = serde_json::json!({ "spec_toml": sft_job(5, 0) }).to_string();
    for bad in ["authorization: Bearer not-the-token", "x-nothing: 1"] {
        let (ok, out) = call(
            &addr,
            bad,
            &[
                "-d",
                &body,
                "-use-reflection=false",
                "-proto",
                "rlhf/v1/jobs.proto",
                "-import-path",
                &proto_dir(),
                "rlhf.v1.JobService/SubmitJob",
            ],
        );
        assert!(!ok && out.contains("Unauthenticated"), "{bad}: {out}");
    }
    let out = Command::new(grpcurl()).args(["-plaintext", "-H", &h, &addr, "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for svc in ["rlhf.v1.JobService", "rlhf.v1.WorkerService", "grpc.health.v1.Health"] {
        assert!(list.contains(svc), "{list}");
    }
    let (ok, health) = call(&addr, &h, &["grpc.health.v1.Health/Check"]);
    assert!(ok && health.contains("SERVING"), "{health}");
    let body = serde_json::json!({ "spec_toml": sft_job(5, 0), "request_id": "grpcurl-1" }).to_string();
    let (ok, sub) = call(&addr, &h, &["-d", &body, "rlhf.v1.JobService/SubmitJob"]);
    assert!(ok && sub.contains("jobId"), "{sub}");
    let (ok, err) = call(
        &addr,
        &h,
        &[
            "-d",
            r#"{"spec_toml": "version = 1\nkind = \"sft\"\n[model]\npath = \"m\"\ndtype = \"f64\"\n"}"#,
            "rlhf.v1.JobService/SubmitJob",
        ],
    );
    assert!(!ok && err.contains("InvalidArgument"), "{err}");
    let (_, jobs) = call(&addr, &h, &["rlhf.v1.JobService/ListJobs"]);
    assert!(jobs.contains("grpcurl") || jobs.contains("sft-e2e"), "{jobs}");
}
