//! The coordinator and workers as processes: submit over gRPC, idempotent
//! submits, bad input, cancel, a worker killed with -9, a coordinator killed
//! with -9 and restarted, and 200 concurrent status calls.

use std::time::{Duration, Instant};

use rlhf_proto::*;
use rlhf_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_runs_a_job_and_duplicate_request_ids_give_one_job() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let req = SubmitJobRequest { spec_toml: sft_job(20, 0), request_id: "req-1".into() };
    let a = c.submit_job(req.clone()).await.unwrap().into_inner();
    let b = c.submit_job(req).await.unwrap().into_inner();
    assert!(a.created && !b.created);
    assert_eq!(a.job_id, b.job_id);
    let jobs = c.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 1, "one request id, one job");

    let j = wait_job(&mut c, &a.job_id, Duration::from_secs(120), is_terminal).await;
    assert_eq!(state_name(j.state), "succeeded", "{j:?}\n{}", cl.logs());
    let out = std::path::PathBuf::from(&j.output_dir);
    assert!(out.join("adapter/adapter_model.safetensors").exists());
    let logs = c
        .get_job_logs(GetJobLogsRequest { job_id: a.job_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(logs.metrics_json.len(), 20, "every step's metrics reach the coordinator");
    let states: Vec<&str> = logs.events.iter().map(|e| state_name(e.state)).collect();
    assert_eq!(states, ["queued", "running", "succeeded"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_jobs_are_refused_or_fail_with_the_cause() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let bad = sft_job(5, 0).replace("lr = 3e-3", "lr = 0.0");
    let err = c.submit_job(SubmitJobRequest { spec_toml: bad, request_id: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("train.lr"), "{}", err.message());
    let err = c
        .submit_job(SubmitJobRequest { spec_toml: "version = 1\nkind = [".into(), request_id: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let missing = sft_job(5, 0).replace(&fixtures().join("tiny-llama").display().to_string(), "/nonexistent/model-dir");
    let id = submit_spec(&mut c, missing).await;
    let j = wait_job(&mut c, &id, Duration::from_secs(60), is_terminal).await;
    assert_eq!(state_name(j.state), "failed");
    assert!(j.reason.contains("/nonexistent/model-dir"), "{}", j.reason);
    let err = c.get_job(GetJobRequest { job_id: "no-such-job".into() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_within_seconds() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let id = submit_spec(&mut c, sft_job(100_000, 0)).await;
    wait_job(&mut c, &id, Duration::from_secs(60), |j| j.progress.as_ref().is_some_and(|p| p.step >= 3)).await;
    let t = Instant::now();
    let j = c.cancel_job(CancelJobRequest { job_id: id.clone() }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(state_name(j.state), "cancelled");
    // The worker really stops: it reports no running job.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let w = c.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers;
        if w.iter().all(|w| w.running_jobs.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "worker still busy after cancel:\n{}", cl.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("cancel: worker idle {:.2}s after CancelJob", t.elapsed().as_secs_f64());
    let steps = read_metrics(std::path::Path::new(&j.output_dir)).len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read_metrics(std::path::Path::new(&j.output_dir)).len(), steps, "no steps after cancel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_its_worker_being_killed() {
    let mut cl = Cluster::start(2, 1500);
    cl.wait_workers(2).await;
    let mut c = cl.client().await;
    let id = submit_spec(&mut c, sft_job(240, 20)).await;
    let j = wait_job(&mut c, &id, Duration::from_secs(60), |j| j.progress.as_ref().is_some_and(|p| p.step >= 45)).await;
    let victim = j.worker_id.clone();
    let workers = c.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers;
    let idx = workers.iter().filter(|w| w.alive).position(|w| w.worker_id == victim).expect("victim listed");
    let name = &workers.iter().filter(|w| w.alive).nth(idx).unwrap().name;
    let proc_idx: usize = name.trim_start_matches("cpu-").parse().unwrap();
    let killed = Instant::now();
    cl.workers[proc_idx].kill().unwrap(); // SIGKILL
    let j = wait_job(&mut c, &id, Duration::from_secs(30), |j| j.attempts >= 2).await;
    let detect = killed.elapsed().as_secs_f64();
    assert_ne!(j.worker_id, victim, "requeued onto the other worker");
    let j = wait_job(&mut c, &id, Duration::from_secs(180), is_terminal).await;
    assert_eq!(state_name(j.state), "succeeded", "{j:?}\n{}", cl.logs());
    let m = read_metrics(std::path::Path::new(&j.output_dir));
    let steps: Vec<u64> = m.iter().filter_map(|r| r["step"].as_u64()).collect();
    let resumed_at = steps.windows(2).find(|w| w[1] <= w[0]).map(|w| w[1]).expect("a resume point in the metrics");
    assert!(resumed_at > 1 && resumed_at % 20 == 1, "resumed after a checkpoint, at step {resumed_at}");
    assert_eq!(*steps.last().unwrap(), 240);
    eprintln!(
        "worker kill: requeued after {detect:.2}s (lease {} ms), resumed at step {resumed_at}, done after {:.2}s",
        cl.lease_ms,
        killed.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_survive_the_coordinator_being_killed_and_restarted() {
    let mut cl = Cluster::start(1, 2000);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let running = submit_spec(&mut c, sft_job(200, 20)).await;
    let queued = submit_spec(&mut c, sft_job(10, 0)).await;
    wait_job(&mut c, &running, Duration::from_secs(60), |j| j.progress.as_ref().is_some_and(|p| p.step >= 10)).await;
    cl.kill_coordinator();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cl.start_coordinator();
    let mut c = cl.client().await;
    let jobs = c.list_jobs(ListJobsRequest {}).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 2, "every job is still listed");
    for id in [&running, &queued] {
        let j = wait_job(&mut c, id, Duration::from_secs(180), is_terminal).await;
        assert_eq!(state_name(j.state), "succeeded", "{j:?}\n{}", cl.logs());
    }
    eprintln!("coordinator restart: both jobs done {:.2}s after the kill", down.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_status_calls_are_all_answered() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let id = submit_spec(&mut c, sft_job(100_000, 0)).await;
    wait_job(&mut c, &id, Duration::from_secs(60), |j| j.progress.as_ref().is_some_and(|p| p.step >= 2)).await;
    let t = Instant::now();
    let calls = (0..200).map(|_| {
        let mut c = c.clone();
        let id = id.clone();
        tokio::spawn(async move { c.get_job(GetJobRequest { job_id: id }).await.map(|r| r.into_inner().job.is_some()) })
    });
    let mut ok = 0;
    for h in calls {
        if matches!(h.await, Ok(Ok(true))) {
            ok += 1;
        }
    }
    assert_eq!(ok, 200);
    let secs = t.elapsed().as_secs_f64();
    eprintln!("200 concurrent GetJob calls answered in {secs:.3}s while training");
    assert!(secs < 5.0, "status calls are slow: {secs:.2}s");
    c.cancel_job(CancelJobRequest { job_id: id }).await.unwrap();
}

fn job_with(base: &str, extra: &str) -> String {
    format!("{base}\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ppo_with_roles_on_another_worker_matches_the_colocated_run() {
    let cl = Cluster::start(2, 3000);
    cl.wait_workers(2).await;
    let mut c = cl.client().await;
    let f = fixtures();
    let p = |s: &str| f.join(s).display().to_string();
    let run = |spec: String| {
        let mut c = c.clone();
        async move {
            let id = submit_spec(&mut c, spec).await;
            wait_job(&mut c, &id, Duration::from_secs(180), is_terminal).await
        }
    };
    let sft = run(sft_job(20, 0)).await;
    assert_eq!(state_name(sft.state), "succeeded", "{sft:?}");
    let reward = format!(
        "version = 1\nkind = \"reward\"\nseed = 2\n[model]\npath = \"{}\"\nmax_length = 256\n[peft]\nmethod = \"lora\"\nr = 4\n\
         [data]\ntask = \"eprstmt\"\nfrom_multiple_choice = true\ntrain = \"{}\"\n[train]\nmax_steps = 10\nbatch_size = 8\nlr = 2e-3\n",
        p("tiny-llama"),
        p("fewclue/eprstmt/train.json")
    );
    let rm = run(reward).await;
    assert_eq!(state_name(rm.state), "succeeded", "{rm:?}");
    let ppo = format!(
        "version = 1\nkind = \"ppo\"\nseed = 9\n[model]\npath = \"{}\"\nmax_length = 256\nmerge_adapters = [\"{}/adapter\"]\n\
         [peft]\nmethod = \"lora\"\nr = 4\n[data]\ntask = \"eprstmt\"\ntrain = \"{}\"\n\
         [ppo]\niterations = 4\nrollout_batch = 8\nminibatch = 4\nmax_new_tokens = 3\nreward = {{ kind = \"model\", path = \"{}/reward_model\" }}\n",
        p("tiny-llama"),
        sft.output_dir,
        p("fewclue/eprstmt/train.json"),
        rm.output_dir
    );
    let colocated = run(ppo.clone()).await;
    assert_eq!(state_name(colocated.state), "succeeded", "{colocated:?}\n{}", cl.logs());
    let split = run(job_with(&ppo, "[placement]\ntrainer = \"cpu-0\"\ncritic = \"cpu-1\"\nreward = \"cpu-1\"\n")).await;
    assert_eq!(state_name(split.state), "succeeded", "{split:?}\n{}", cl.logs());

    let logs = c
        .get_job_logs(GetJobLogsRequest { job_id: split.job_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(logs.events.iter().any(|e| e.message.contains("reward and critic on worker cpu-1")), "{:?}", logs.events);
    let strip = |dir: &str| {
        read_metrics(std::path::Path::new(dir))
            .into_iter()
            .map(|mut r| {
                r.as_object_mut()
                    .unwrap()
                    .retain(|k, _| k != "tokens_per_s" && k != "bytes_exchanged" && !k.starts_with("time_"));
                r
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (strip(&colocated.output_dir), strip(&split.output_dir));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "split run differs from the colocated one");
    let bytes: Vec<u64> = read_metrics(std::path::Path::new(&split.output_dir))
        .iter()
        .map(|r| r["bytes_exchanged"].as_u64().unwrap())
        .collect();
    let model_bytes = std::fs::metadata(f.join("tiny-llama")).map(|_| 0).unwrap_or(0)
        + std::fs::read_dir(f.join("tiny-llama"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .map(|e| e.metadata().unwrap().len())
            .sum::<u64>();
    assert!(
        bytes.iter().all(|&b| b > 0 && b < model_bytes),
        "per-iteration bytes {bytes:?} vs base model {model_bytes}"
    );
    eprintln!("ppo split: bytes per iteration {bytes:?}; base model {model_bytes} bytes");
    assert!(read_metrics(std::path::Path::new(&colocated.output_dir))
        .iter()
        .all(|r| r["bytes_exchanged"].as_u64() == Some(0)));
}
