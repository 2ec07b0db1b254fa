//! Rollout on its own workers: the disaggregated run equals the colocated
//! one for LoRA, SSF and RepAdapter (adapter tensors are all that is synced,
//! and their bytes are counted); async rollout learns; a rollout worker
//! killed mid-job has its share regenerated; unmet placement is explained.

use std::path::Path;
use std::time::Duration;

use rlhf_proto::*;
use rlhf_tests::*;

fn ppo_job(method: &str, seed: u64, iterations: usize, extra: &str) -> String {
    ppo_job_on("", method, seed, iterations, "reward = { kind = \"label\" }\n", extra)
}

/// A PPO job on the tiny model (with `sft` merged, if given).
fn ppo_job_on(sft: &str, method: &str, seed: u64, iterations: usize, reward: &str, extra: &str) -> String {
    let f = fixtures();
    let p = |s: &str| f.join(s).display().to_string();
    let merge = if sft.is_empty() { String::new() } else { format!("merge_adapters = [\"{sft}/adapter\"]\n") };
    format!(
        "version = 1\nkind = \"ppo\"\nseed = {seed}\n[model]\npath = \"{}\"\nmax_length = 128\n{merge}\
         [peft]\nmethod = \"{method}\"\nr = 4\n[data]\ntask = \"eprstmt\"\ntrain = \"{}\"\n\
         [ppo]\niterations = {iterations}\nrollout_batch = 8\nminibatch = 4\nmax_new_tokens = 3\ntemperature = 1.0\n\
         lr = 3e-3\ncritic_lr = 3e-3\n{reward}{extra}",
        p("tiny-llama"),
        p("fewclue/eprstmt/train.json"),
    )
}

/// Largest |a − b| / (1 + |a|) over the numbers of two metric series.
fn max_rel_diff(a: &[serde_json::Value], b: &[serde_json::Value]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (k, v) in x {
            match (v.as_f64(), y[k].as_f64()) {
                (Some(p), Some(q)) => worst = worst.max((p - q).abs() / (1.0 + p.abs())),
                _ => assert_eq!(v, &y[k], "{k}"),
            }
        }
    }
    worst
}

/// Largest |a − b| over two adapters' f32 tensors.
fn max_tensor_diff(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)]) -> f64 {
    assert_eq!(a.len(), b.len());
    let f = |d: &[u8]| d.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
    let mut worst = 0f64;
    for ((n, x), (m, y)) in a.iter().zip(b) {
        assert_eq!(n, m);
        for (p, q) in f(x).into_iter().zip(f(y)) {
            worst = worst.max((p - q).abs() as f64);
        }
    }
    worst
}

async fn run(c: &mut rlhf_proto::auth::JobClient, spec: String) -> Job {
    let id = submit_spec(c, spec).await;
    wait_job(c, &id, Duration::from_secs(240), is_terminal).await
}

/// Metrics without times, byte counts and worker counts.
fn learning_metrics(dir: &str) -> Vec<serde_json::Value> {
    read_metrics(Path::new(dir))
        .into_iter()
        .map(|mut r| {
            r.as_object_mut().unwrap().retain(|k, _| {
                !k.starts_with("time_") && !k.starts_with("bytes_") && k != "tokens_per_s" && k != "rollout_workers"
            });
            r
        })
        .collect()
}

fn adapter(dir: &str, sub: &str) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(Path::new(dir).join(sub).join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    out.sort();
    out
}

/// f32 elements of an adapter.
fn numel(tensors: &[(String, Vec<u8>)]) -> u64 {
    tensors.iter().map(|(_, d)| d.len() as u64 / 4).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_workers_give_the_colocated_run_for_every_peft_method() {
    let cl = Cluster::start(3, 3000);
    cl.wait_workers(3).await;
    let mut c = cl.client().await;
    let base_bytes: u64 = std::fs::read_dir(fixtures().join("tiny-llama"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    for method in ["lora", "ssf", "repadapter"] {
        let colocated = run(&mut c, ppo_job(method, 5, 3, "")).await;
        assert_eq!(state_name(colocated.state), "succeeded", "{colocated:?}\n{}", cl.logs());
        let placement = "[placement]\ntrainer = \"cpu-0\"\nrollout = [\"cpu-1\", \"cpu-2\"]\n";
        let split = run(&mut c, ppo_job(method, 5, 3, placement)).await;
        assert_eq!(state_name(split.state), "succeeded", "{split:?}\n{}", cl.logs());
        let logs = c
            .get_job_logs(GetJobLogsRequest { job_id: split.job_id.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(
            logs.events.iter().any(|e| e.message.contains("rollout on workers cpu-1") && e.message.contains("cpu-2")),
            "{:?}",
            logs.events
        );

        // The same tokens (rewards, lengths), and numbers equal up to the
        // float rounding of generating 4 rows at a time instead of 8.
        let (a, b) = (learning_metrics(&colocated.output_dir), learning_metrics(&split.output_dir));
        assert_eq!(a.len(), 3);
        for key in ["reward_mean", "response_len", "score_mean"] {
            let series = |m: &[serde_json::Value]| m.iter().map(|r| r[key].clone()).collect::<Vec<_>>();
            assert_eq!(series(&a), series(&b), "{method}: {key}");
        }
        let metrics_diff = max_rel_diff(&a, &b);
        let adapter_diff = ["adapter", "critic"]
            .map(|sub| max_tensor_diff(&adapter(&colocated.output_dir, sub), &adapter(&split.output_dir, sub)));
        eprintln!(
            "{method}: rollout workers vs colocated: metrics max rel diff {metrics_diff:.1e}, policy max |diff| {:.1e}, critic {:.1e}",
            adapter_diff[0], adapter_diff[1]
        );
        assert!(metrics_diff < 1e-4, "{method}: metrics differ by {metrics_diff:e}");
        assert!(adapter_diff.iter().all(|&d| d < 1e-4), "{method}: adapters differ by {adapter_diff:?}");

        let policy_bytes = numel(&adapter(&split.output_dir, "adapter")) * 4;
        for r in read_metrics(Path::new(&split.output_dir)) {
            assert_eq!(r["bytes_adapter_sync"].as_u64(), Some(2 * policy_bytes), "{method}: {r}");
            assert_eq!(r["rollout_workers"].as_u64(), Some(2));
            let total = r["bytes_exchanged"].as_u64().unwrap();
            assert!(total > 2 * policy_bytes && total < base_bytes, "{method}: {total} bytes vs base {base_bytes}");
        }
        eprintln!(
            "{method}: adapter sync {} bytes per iteration (2 workers × {policy_bytes}); base {base_bytes} bytes",
            2 * policy_bytes
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_rollout_learns_and_a_killed_rollout_worker_is_replaced() {
    let mut cl = Cluster::start(3, 3000);
    cl.wait_workers(3).await;
    let mut c = cl.client().await;
    // One step off-policy: generated while the trainer updates.
    let placement = "[placement]\ntrainer = \"cpu-0\"\nrollout = [\"cpu-1\", \"*\"]\n";
    let sft = run(&mut c, sft_job(60, 0)).await;
    assert_eq!(state_name(sft.state), "succeeded", "{sft:?}");
    // The SFT policy answers "A" for about half the reviews; the reward wants it always.
    let reward = "reward = { kind = \"match\", text = \"A\" }\n";
    let job = ppo_job_on(&sft.output_dir, "lora", 3, 25, reward, &format!("rollout_ahead = 1\n{placement}"));
    let ahead = run(&mut c, job).await;
    assert_eq!(state_name(ahead.state), "succeeded", "{ahead:?}\n{}", cl.logs());
    let m = read_metrics(Path::new(&ahead.output_dir));
    let mean =
        |rs: &[serde_json::Value]| rs.iter().map(|r| r["reward_mean"].as_f64().unwrap()).sum::<f64>() / rs.len() as f64;
    let (first, last) = (mean(&m[..3]), mean(&m[20..]));
    eprintln!("async rollout: reward {first:.3} over the first 3 iterations, {last:.3} over the last 5");
    assert!(last > first + 0.2, "async rollout did not learn: {first} → {last}");

    // Kill rollout worker cpu-2 while a job generates on it.
    let id = c
        .submit_job(SubmitJobRequest {
            spec_toml: ppo_job("lora", 8, 30, "[placement]\ntrainer = \"cpu-0\"\nrollout = [\"cpu-1\", \"cpu-2\"]\n"),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    wait_job(&mut c, &id, Duration::from_secs(120), |j| j.progress.as_ref().is_some_and(|p| p.step >= 3)).await;
    let victim = &mut cl.workers[2];
    victim.kill().unwrap();
    victim.wait().unwrap();
    let job = wait_job(&mut c, &id, Duration::from_secs(240), is_terminal).await;
    assert_eq!(state_name(job.state), "succeeded", "{job:?}\n{}", cl.logs());
    let logs =
        c.get_job_logs(GetJobLogsRequest { job_id: id.clone(), ..Default::default() }).await.unwrap().into_inner();
    assert!(
        logs.events.iter().any(|e| e.message.contains("rollout worker 1") && e.message.contains("lost")),
        "{:?}",
        logs.events
    );
    let m = read_metrics(Path::new(&job.output_dir));
    assert_eq!(m.len(), 30);
    assert_eq!(m[0]["rollout_workers"].as_u64(), Some(2));
    assert_eq!(m[29]["rollout_workers"].as_u64(), Some(1), "{}", m[29]);
    assert_eq!(job.attempts, 1, "the job went on without a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_for_absent_workers_says_which() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let spec = ppo_job("lora", 1, 1, "[placement]\ntrainer = \"cpu-0\"\nrollout = [\"gpu-7\"]\n");
    let id = submit_spec(&mut c, spec).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs =
            c.get_job_logs(GetJobLogsRequest { job_id: id.clone(), ..Default::default() }).await.unwrap().into_inner();
        if let Some(e) = logs.events.iter().find(|e| e.message.contains("waiting for workers")) {
            assert!(e.message.contains("rollout[0] on \"gpu-7\""), "{}", e.message);
            assert!(e.message.contains("connected: cpu-0 (idle)"), "{}", e.message);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no explanation: {:?}", logs.events);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = c.get_job(GetJobRequest { job_id: id }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(state_name(job.state), "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_batch_allocation_an_unmeetable_placement_fails_at_once() {
    let cl = Cluster::start_with(1, 3000, |_| vec!["--fail-unplaceable".into()]);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let spec = ppo_job("lora", 1, 1, "[placement]\ntrainer = \"cpu-0\"\nrollout = [\"gpu-7\"]\n");
    let id = submit_spec(&mut c, spec).await;
    let job = wait_job(&mut c, &id, Duration::from_secs(10), is_terminal).await;
    assert_eq!(state_name(job.state), "failed", "{job:?}");
    assert!(
        job.reason.contains("absent: rollout[0] on \"gpu-7\"") && job.reason.contains("connected: cpu-0"),
        "{}",
        job.reason
    );
    // A placement the cluster can meet still runs.
    let ok = submit_spec(&mut c, ppo_job("lora", 1, 1, "[placement]\ntrainer = \"cpu-0\"\n")).await;
    let ok = wait_job(&mut c, &ok, Duration::from_secs(60), is_terminal).await;
    assert_eq!(state_name(ok.state), "succeeded", "{ok:?}");
}
