//! Data parallel across worker processes, summing through the coordinator:
//! two CPU workers train the adapter one worker trains on the same global
//! batches and seed; the job survives a rank killed with -9 and a
//! coordinator killed with -9, and still ends with that adapter.

use std::path::Path;
use std::time::{Duration, Instant};

use rlhf_proto::auth::JobClient;
use rlhf_proto::*;
use rlhf_tests::*;

const DP: &str = "[placement]\ndata_parallel = 2\ncollective = \"coordinator\"\n";

async fn submit(c: &mut JobClient, spec: String) -> String {
    submit_spec(c, spec).await
}

/// Largest |a - b| over the f32 tensors of two adapter directories.
fn adapter_diff(a: &str, b: &str) -> f64 {
    let read = |d: &str| std::fs::read(Path::new(d).join("adapter/adapter_model.safetensors")).unwrap();
    let (ba, bb) = (read(a), read(b));
    let (ta, tb) =
        (safetensors::SafeTensors::deserialize(&ba).unwrap(), safetensors::SafeTensors::deserialize(&bb).unwrap());
    let f32s = |v: &[u8]| v.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
    assert!(!ta.names().is_empty());
    let mut d = 0f64;
    for name in ta.names() {
        let (x, y) = (ta.tensor(name).unwrap(), tb.tensor(name).unwrap());
        assert_eq!(x.shape(), y.shape(), "{name}");
        for (p, q) in f32s(x.data()).iter().zip(f32s(y.data())) {
            d = d.max((p - q).abs() as f64);
        }
    }
    d
}

fn losses(dir: &str) -> Vec<f64> {
    read_metrics(Path::new(dir)).iter().filter_map(|r| r["loss"].as_f64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_train_the_adapter_of_one() {
    let cl = Cluster::start(2, 3000);
    cl.wait_workers(2).await;
    let mut c = cl.client().await;
    let one = submit(&mut c, sft_job(30, 0)).await;
    let one = wait_job(&mut c, &one, Duration::from_secs(180), is_terminal).await;
    assert_eq!(state_name(one.state), "succeeded", "{one:?}\n{}", cl.logs());
    let two = submit(&mut c, format!("{}{DP}", sft_job(30, 0))).await;
    let two = wait_job(&mut c, &two, Duration::from_secs(180), is_terminal).await;
    assert_eq!(state_name(two.state), "succeeded", "{two:?}\n{}", cl.logs());

    let d = adapter_diff(&one.output_dir, &two.output_dir);
    eprintln!("data parallel (2 workers) vs 1 worker: max |adapter diff| = {d:e}");
    assert!(d < 2e-5, "adapters differ by {d:e}");
    let (l1, l2) = (losses(&one.output_dir), losses(&two.output_dir));
    assert_eq!(l1.len(), 30);
    assert!(l1.iter().zip(&l2).all(|(a, b)| (a - b).abs() < 1e-5), "{l1:?}\n{l2:?}");
    let logs = c
        .get_job_logs(GetJobLogsRequest { job_id: two.job_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(logs.events.iter().any(|e| e.message.contains("data parallel: rank 0 on worker")), "{:?}", logs.events);
    let relayed = logs.events.iter().find_map(|e| e.message.split("; ").nth(1).map(String::from)).unwrap_or_default();
    eprintln!("data parallel: {relayed}");
    assert!(relayed.contains("payload bytes relayed"), "{:?}", logs.events);
    assert_eq!(logs.metrics_json.len(), 30, "rank 0's records only");
    assert!(Path::new(&two.output_dir).join("metrics-rank1.jsonl").exists());
}

/// The workers running a rank of `job`: rank 0 first.
async fn ranks(c: &mut JobClient, job: &Job) -> Vec<String> {
    let workers = c.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers;
    let mut r: Vec<&Worker> = workers.iter().filter(|w| w.alive && w.running_jobs.contains(&job.job_id)).collect();
    r.sort_by_key(|w| w.worker_id != job.worker_id);
    r.iter().map(|w| w.name.clone()).collect()
}

fn proc_index(name: &str) -> usize {
    name.trim_start_matches("cpu-").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_parallel_job_survives_a_killed_rank_and_a_killed_coordinator() {
    let mut cl = Cluster::start(3, 1500);
    cl.wait_workers(3).await;
    let mut c = cl.client().await;
    let steps = 120;
    let id = submit(&mut c, format!("{}{DP}", sft_job(steps, 20))).await;
    let j =
        wait_job(&mut c, &id, Duration::from_secs(120), |j| j.progress.as_ref().is_some_and(|p| p.step >= 45)).await;
    let names = ranks(&mut c, &j).await;
    assert_eq!(names.len(), 2, "two ranks: {names:?}");
    // Kill rank 1: the job goes back to the queue and resumes on two live workers.
    let killed = Instant::now();
    cl.workers[proc_index(&names[1])].kill().unwrap();
    let j = wait_job(&mut c, &id, Duration::from_secs(60), |j| j.attempts >= 2 && j.state == JobState::Running as i32)
        .await;
    eprintln!("rank kill: running again after {:.2}s (lease {} ms)", killed.elapsed().as_secs_f64(), cl.lease_ms);
    let step = j.progress.as_ref().map_or(0, |p| p.step);
    wait_job(&mut c, &id, Duration::from_secs(120), |j| j.progress.as_ref().is_some_and(|p| p.step >= step + 5)).await;
    // Kill the coordinator: the ranks keep their group and finish the job.
    cl.kill_coordinator();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cl.start_coordinator();
    let mut c = cl.client().await;
    let j = wait_job(&mut c, &id, Duration::from_secs(240), is_terminal).await;
    assert_eq!(state_name(j.state), "succeeded", "{j:?}\n{}", cl.logs());
    assert_eq!(j.attempts, 2, "the coordinator restart did not requeue it: {j:?}");
    let m = read_metrics(Path::new(&j.output_dir));
    let seen: Vec<u64> = m.iter().filter_map(|r| r["step"].as_u64()).collect();
    let resumed_at = seen.windows(2).find(|w| w[1] <= w[0]).map(|w| w[1]).expect("a resume point");
    assert!(resumed_at > 1 && resumed_at % 20 == 1, "resumed after a checkpoint, at step {resumed_at}");
    assert_eq!(*seen.last().unwrap(), steps as u64);

    // The same job on one worker ends with the same adapter.
    let one = submit(&mut c, sft_job(steps, 20)).await;
    let one = wait_job(&mut c, &one, Duration::from_secs(240), is_terminal).await;
    assert_eq!(state_name(one.state), "succeeded", "{one:?}");
    let d = adapter_diff(&one.output_dir, &j.output_dir);
    eprintln!("data parallel after a rank kill and a coordinator kill vs 1 worker: max |adapter diff| = {d:e}");
    assert!(d < 5e-5, "adapters differ by {d:e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ppo_on_two_workers_trains_the_policy_of_one() {
    let cl = Cluster::start(2, 3000);
    cl.wait_workers(2).await;
    let mut c = cl.client().await;
    let f = fixtures();
    let ppo = format!(
        "version = 1\nkind = \"ppo\"\nseed = 4\n[model]\npath = \"{}\"\nmax_length = 128\n[peft]\nmethod = \"lora\"\nr = 4\n\
         [data]\ntask = \"eprstmt\"\ntrain = \"{}\"\n[ppo]\niterations = 4\nrollout_batch = 8\nminibatch = 3\nmax_new_tokens = 3\n\
         temperature = 1.0\nlr = 3e-3\nreward = {{ kind = \"label\" }}\n",
        f.join("tiny-llama").display(),
        f.join("fewclue/eprstmt/train.json").display()
    );
    let one = submit(&mut c, ppo.clone()).await;
    let one = wait_job(&mut c, &one, Duration::from_secs(180), is_terminal).await;
    assert_eq!(state_name(one.state), "succeeded", "{one:?}\n{}", cl.logs());
    let two = submit(&mut c, format!("{ppo}{DP}")).await;
    let two = wait_job(&mut c, &two, Duration::from_secs(180), is_terminal).await;
    assert_eq!(state_name(two.state), "succeeded", "{two:?}\n{}", cl.logs());
    let d = adapter_diff(&one.output_dir, &two.output_dir);
    eprintln!("ppo, data parallel (2 workers) vs 1 worker: max |policy adapter diff| = {d:e}");
    assert!(d < 2e-5, "policy adapters differ by {d:e}");
    let reward =
        |dir: &str| read_metrics(Path::new(dir)).iter().map(|r| r["reward_mean"].as_f64().unwrap()).collect::<Vec<_>>();
    let (r1, r2) = (reward(&one.output_dir), reward(&two.output_dir));
    assert!(r1.iter().zip(&r2).all(|(a, b)| (a - b).abs() < 1e-5), "{r1:?}\n{r2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_data_parallel_job_fails_with_the_cause_and_frees_every_rank() {
    let cl = Cluster::start(2, 3000);
    cl.wait_workers(2).await;
    let mut c = cl.client().await;
    let missing = sft_job(5, 0).replace(&fixtures().join("tiny-llama").display().to_string(), "/nonexistent/model-dir");
    let id = submit(&mut c, format!("{missing}{DP}")).await;
    let j = wait_job(&mut c, &id, Duration::from_secs(60), is_terminal).await;
    assert_eq!(state_name(j.state), "failed", "{j:?}");
    assert!(j.reason.contains("/nonexistent/model-dir"), "{}", j.reason);
    // NCCL asked for on CPU workers: refused with the reason, not a crash.
    let id = submit(&mut c, format!("{}{}", sft_job(3, 0), DP.replace("coordinator", "nccl"))).await;
    let j = wait_job(&mut c, &id, Duration::from_secs(60), is_terminal).await;
    assert_eq!(state_name(j.state), "failed", "{j:?}");
    assert!(j.reason.contains("needs every rank on a GPU"), "{}", j.reason);
    // Both ranks stop: the workers take the next job.
    let ok = submit(&mut c, format!("{}{DP}", sft_job(3, 0))).await;
    let ok = wait_job(&mut c, &ok, Duration::from_secs(60), is_terminal).await;
    assert_eq!(state_name(ok.state), "succeeded", "{ok:?}\n{}", cl.logs());
}
