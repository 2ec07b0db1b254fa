//! `/metrics` scraped by the real Prometheus server (Debian's, installed by
//! scripts/test.sh): without a token the endpoint answers 401; Prometheus,
//! given the admin token, scrapes it, and its query API returns the job
//! state series of a job that ran.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rlhf_tests::*;

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// (status, body) of a plain HTTP/1.0 GET.
fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_job_states() {
    let http = port();
    let cl = Cluster::start_with(1, 3000, |_| vec!["--http".into(), format!("127.0.0.1:{http}")]);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let id = submit_spec(&mut c, sft_job(5, 0)).await;
    let job = wait_job(&mut c, &id, Duration::from_secs(60), is_terminal).await;
    assert_eq!(state_name(job.state), "succeeded");

    let token = cl.admin_token().unwrap();
    assert_eq!(get(http, "/metrics", None).0, 401);
    assert_eq!(get(http, "/metrics", Some("wrong")).0, 401);
    let (status, text) = get(http, "/metrics", Some(&token));
    assert_eq!(status, 200, "{text}");
    for want in [
        "rlhfd_jobs{state=\"succeeded\"} 1",
        "rlhfd_workers_alive 1",
        "rlhfd_grpc_requests_total{method=\"SubmitJob\"} 1",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }

    // The real Prometheus scrapes it with the token.
    let dir = cl.dir.path();
    let prom = port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: rlhfd\n    authorization:\n      credentials_file: {}\n    static_configs:\n      - targets: ['127.0.0.1:{http}']\n",
            cl.data_dir().join("admin.token").display()
        ),
    )
    .unwrap();
    let mut server = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join("prometheus.log")).unwrap()))
        .spawn()
        .expect("the prometheus server (scripts/test.sh installs Debian's)");
    let query = "/api/v1/query?query=rlhfd_jobs%7Bstate%3D%22succeeded%22%7D";
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let (status, body) = get(prom, query, None);
        if status == 200 && body.contains("\"result\":[{") {
            break body;
        }
        if Instant::now() > deadline {
            let _ = server.kill();
            panic!(
                "no scrape within 60 s: {body}\n{}",
                std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = server.kill();
    let _ = server.wait();
    eprintln!("prometheus query rlhfd_jobs{{state=\"succeeded\"}}: {answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let r = &v["data"]["result"][0];
    assert_eq!(r["metric"]["state"], "succeeded", "{answer}");
    assert_eq!(r["metric"]["job"], "rlhfd", "{answer}");
    assert_eq!(r["value"][1], "1", "{answer}");
}
