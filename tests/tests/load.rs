//! A worker whose training saturates every core keeps its lease: under the
//! default 5 s lease, with other training processes on every core too, a
//! job runs as one attempt, never requeued, never started twice.

use std::process::Child;
use std::time::Duration;

use rlhf_tests::*;

/// `rlhf-worker run` of an SFT job long enough to outlast the test's job,
/// with as many torch threads as cores, at the priority a worker trains at
/// (nice +10), so it competes with the worker's training as an equal.
fn hog(dir: &std::path::Path, i: usize, threads: usize) -> Child {
    let job = dir.join(format!("hog-{i}.toml"));
    std::fs::write(&job, sft_job(100_000, 0)).expect("hog job");
    let mut c = command("nice".into());
    c.args(["-n", "10"])
        .arg(bin("rlhf-worker"))
        .args(["--threads", &threads.to_string(), "run"])
        .arg(&job)
        .arg("--out")
        .arg(dir.join(format!("hog-{i}")))
        .env("RLHF_QUIET", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c.spawn().expect("start a training process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_on_every_core_loses_no_heartbeat_and_runs_one_attempt() {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // The coordinator's default lease; the worker's default heartbeat.
    let mut cl = Cluster::start(0, 5000);
    let child = command(bin("rlhf-worker"))
        .args(["--threads", &cores.to_string(), "serve", "--coordinator", &cl.url(), "--device", "cpu"])
        .args(["--name", "cpu-0", "--token-file"])
        .arg(cl.data_dir().join("worker.token"))
        .env("RLHF_QUIET", "1")
        .stdout(std::fs::File::create(cl.dir.path().join("cpu-0.log")).expect("worker log"))
        .stderr(std::fs::File::create(cl.dir.path().join("cpu-0.err.log")).expect("worker log"))
        .spawn()
        .expect("start worker");
    cl.workers.push(child);
    cl.wait_workers(1).await;
    let mut hogs: Vec<Child> = (0..cores).map(|i| hog(cl.dir.path(), i, cores)).collect();
    let mut c = cl.client().await;
    // Several lease lengths of training on a machine with every core busy.
    let id = submit_spec(&mut c, sft_job(150, 0)).await;
    let job = wait_job(&mut c, &id, Duration::from_secs(600), is_terminal).await;
    for h in &mut hogs {
        let _ = h.kill();
        let _ = h.wait();
    }
    let events = c
        .get_job_logs(rlhf_proto::GetJobLogsRequest { job_id: id.clone(), ..Default::default() })
        .await
        .expect("logs")
        .into_inner()
        .events;
    let text: Vec<String> = events.iter().map(|e| format!("{}: {}", state_name(e.state), e.message)).collect();
    assert_eq!(state_name(job.state), "succeeded", "{text:#?}\n{}", cl.logs());
    assert_eq!(job.attempts, 1, "{text:#?}");
    assert!(!text.iter().any(|e| e.contains("requeued") || e.contains("lost")), "{text:#?}");
    let logs = cl.logs();
    assert!(!logs.contains("worker lost"), "{logs}");
    // The run took longer than a lease, so heartbeats did carry it.
    let secs = (job.updated_at_ms - job.created_at_ms) as f64 / 1000.0;
    eprintln!("one attempt in {secs:.1} s under load ({cores} cores, {cores} training processes beside it)");
    assert!(secs > 5.0, "the job took {secs:.1} s, under one lease: make it longer");
}
