//! The control plane under attack and faults, each case one test: what a
//! peer without the right token, or with a forged or oversized message, or a
//! crash, can no longer do.

use std::time::Instant;

use rlhf_proto::auth::{Bearer, WorkerClient};
use rlhf_proto::worker_service_client::WorkerServiceClient;
use rlhf_proto::*;
use rlhf_tests::*;
use tonic::Code;

const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789ab";

fn with_clients(dir: &std::path::Path) -> Vec<String> {
    let f = dir.join("clients.toml");
    std::fs::write(&f, format!("alice = \"{ALICE}\"\nbob = \"{BOB}\"\n")).unwrap();
    vec!["--client-tokens".into(), f.display().to_string()]
}

async fn worker_client(cl: &Cluster, bearer: Bearer) -> WorkerClient {
    let ch = tonic::transport::Endpoint::from_shared(cl.url()).unwrap().connect().await.unwrap();
    WorkerServiceClient::with_interceptor(ch, bearer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_right_token_are_refused_and_only_the_owner_cancels() {
    let cl = Cluster::start_with(1, 3000, with_clients);
    cl.wait_workers(1).await;
    let admin = cl.admin_token().unwrap();
    let submit = |spec: String| SubmitJobRequest { spec_toml: spec, request_id: String::new() };

    // No token, a wrong one, the worker's: Unauthenticated, on loopback too.
    let worker_token = std::fs::read_to_string(cl.data_dir().join("worker.token")).unwrap();
    for bearer in [Bearer::none(), Bearer::new("not-a-token").unwrap(), Bearer::new(&worker_token).unwrap()] {
        let mut c = cl.client_with(bearer).await.unwrap();
        let e = c.submit_job(submit(sft_job(5, 0))).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        let e = c.list_jobs(ListJobsRequest {}).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    }
    // A worker session needs the worker token: a client's is refused.
    let reg = WorkerMessage {
        msg: Some(worker_message::Msg::Register(Register {
            worker_id: "intruder".into(),
            name: "cpu-9".into(),
            ..Default::default()
        })),
    };
    let mut w = worker_client(&cl, Bearer::new(&admin).unwrap()).await;
    let e = w.session(tokio_stream::iter(vec![reg])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // Alice's job: Bob may not cancel it; Alice may.
    let mut alice = cl.client_with(Bearer::new(ALICE).unwrap()).await.unwrap();
    let mut bob = cl.client_with(Bearer::new(BOB).unwrap()).await.unwrap();
    let id = alice.submit_job(submit(sft_job(400, 0))).await.unwrap().into_inner().job_id;
    let e = bob.cancel_job(CancelJobRequest { job_id: id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("alice"), "{e}");
    let j = alice.cancel_job(CancelJobRequest { job_id: id }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(state_name(j.state), "cancelled");
    // The admin may cancel anyone's.
    let id = bob.submit_job(submit(sft_job(400, 0))).await.unwrap().into_inner().job_id;
    let mut root = cl.client().await;
    let j = root.cancel_job(CancelJobRequest { job_id: id }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(state_name(j.state), "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_with_and_without_a_token() {
    let cl = Cluster::start(0, 3000);
    let mut c = cl.client().await;
    let id = submit_spec(&mut c, sft_job(5, 0)).await;
    let token = cl.admin_token().unwrap();
    for with_token in [true, false] {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let bearer = if with_token { Bearer::new(&token).unwrap() } else { Bearer::none() };
            let (url, id) = (cl.url(), id.clone());
            tasks.push(tokio::spawn(async move {
                let ch = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
                let mut c = job_service_client::JobServiceClient::with_interceptor(ch, bearer);
                c.get_job(GetJobRequest { job_id: id }).await.map(|_| ()).map_err(|e| e.code())
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        let secs = t.elapsed().as_secs_f64();
        if with_token {
            assert!(results.iter().all(Result::is_ok), "{results:?}");
        } else {
            assert!(results.iter().all(|r| *r == Err(Code::Unauthenticated)), "{results:?}");
        }
        eprintln!("200 concurrent clients (connect + GetJob), token {with_token}: {secs:.3} s");
        assert!(secs < 10.0);
    }
}

/// A raw worker session: Register first, then whatever the test sends.
async fn session(
    cl: &Cluster,
    reg: Register,
) -> Result<(tokio::sync::mpsc::Sender<WorkerMessage>, tonic::Streaming<CoordinatorMessage>), tonic::Status> {
    let token = std::fs::read_to_string(cl.data_dir().join("worker.token")).unwrap();
    let mut w = worker_client(cl, Bearer::new(&token).unwrap()).await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(WorkerMessage { msg: Some(worker_message::Msg::Register(reg)) }).await.unwrap();
    let inbound = w.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

fn register(id: &str, key: &str) -> Register {
    Register {
        worker_id: id.into(),
        name: format!("{id}-name"),
        device: "cpu".into(),
        session_key: key.into(),
        ..Default::default()
    }
}

/// Submits a long SFT job and waits until it runs.
async fn running_job(c: &mut rlhf_proto::auth::JobClient) -> Job {
    let id = submit_spec(c, sft_job(100_000, 0)).await;
    wait_job(c, &id, std::time::Duration::from_secs(60), |j| state_name(j.state) == "running").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_worker_messages_and_a_stolen_identity_are_refused() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let job = running_job(&mut c).await;
    let owner = job.worker_id.clone();

    // Another process claiming the running worker's id: refused.
    let e = session(&cl, register(&owner, "a-different-secret-key")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    // A worker of its own (authenticated) forges the job's result and progress.
    let (tx, _inbound) = session(&cl, register("forger", "forger-session-key-0123")).await.unwrap();
    let forged_progress = TaskProgress {
        job_id: job.job_id.clone(),
        progress: Some(Progress { stage: "sft".into(), step: 999_999, total: 999_999, metrics_json: "{}".into() }),
        attempt: job.attempts,
    };
    let forged_result = TaskResult {
        job_id: job.job_id.clone(),
        ok: true,
        reason: String::new(),
        cancelled: false,
        attempt: job.attempts,
        retry: false,
    };
    for msg in [worker_message::Msg::Progress(forged_progress), worker_message::Msg::Result(forged_result)] {
        tx.send(WorkerMessage { msg: Some(msg) }).await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let now = c.get_job(GetJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(state_name(now.state), "running", "{now:?}");
    assert!(now.progress.as_ref().is_none_or(|p| p.step < 999_999), "{now:?}");
    assert_eq!(now.worker_id, owner);
    c.cancel_job(CancelJobRequest { job_id: job.job_id }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_world_and_an_oversized_message_leave_the_coordinator_up() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let job = running_job(&mut c).await;
    // Claims rank 0 of a world of 4 billion for the running job (today's
    // coordinator would allocate ~100 GB for it).
    let mut reg = register("claimer", "claimer-session-key-0123");
    reg.jobs = Some(WorkerJobs {
        ranks: vec![RankJob { job_id: job.job_id.clone(), rank: 0, world: u32::MAX }],
        ..Default::default()
    });
    let (tx, _inbound) = session(&cl, reg).await.unwrap();
    // And a 65 MiB collective part.
    let big = Collective { job_id: job.job_id.clone(), payload: vec![7u8; 65 << 20], ..Default::default() };
    let _ = tx.send(WorkerMessage { msg: Some(worker_message::Msg::Collective(big)) }).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let now = c.get_job(GetJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner().job.unwrap();
    assert_eq!(state_name(now.state), "running", "{now:?}");
    // A 2 MiB job file is refused with its size.
    let big_spec = format!("{}\n# {}\n", sft_job(5, 0), "x".repeat(2 << 20));
    let e = c.submit_job(SubmitJobRequest { spec_toml: big_spec, request_id: String::new() }).await.unwrap_err();
    assert!(matches!(e.code(), Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted), "{e}");
    c.cancel_job(CancelJobRequest { job_id: job.job_id }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_escape_and_relative_paths_are_refused_with_the_field() {
    let cl = Cluster::start(0, 3000);
    let mut c = cl.client().await;
    let cases = [
        (sft_job(5, 0).replace("name = \"sft-e2e\"", "name = \"../../other-job\""), "name:"),
        (sft_job(5, 0).replace(&fixtures().join("tiny-llama").display().to_string(), "tiny-llama"), "model.path:"),
    ];
    for (spec, field) in cases {
        let e = c.submit_job(SubmitJobRequest { spec_toml: spec, request_id: String::new() }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().starts_with(field), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_losing_its_worker_fails_after_max_attempts() {
    let mut cl = Cluster::start(3, 1500);
    cl.wait_workers(3).await;
    let mut c = cl.client().await;
    let spec = format!("{}\n[placement]\nmax_attempts = 2\n", sft_job(100_000, 0));
    let id = submit_spec(&mut c, spec).await;
    let mut killed = 0;
    let job = loop {
        let j = wait_job(&mut c, &id, std::time::Duration::from_secs(60), |j| {
            is_terminal(j) || (state_name(j.state) == "running" && j.attempts > killed)
        })
        .await;
        if is_terminal(&j) {
            break j;
        }
        // The job "crashes" its worker: kill -9 that worker.
        let workers = c.list_workers(ListWorkersRequest {}).await.unwrap().into_inner().workers;
        let name = workers.iter().find(|w| w.worker_id == j.worker_id).unwrap().name.clone();
        let k: usize = name.trim_start_matches("cpu-").parse().unwrap();
        cl.workers[k].kill().unwrap();
        cl.workers[k].wait().unwrap();
        killed += 1;
        assert!(killed <= 2, "a third attempt started: {j:?}");
    };
    assert_eq!(state_name(job.state), "failed", "{job:?}");
    assert!(job.reason.contains("gave up after 2 attempts"), "{}", job.reason);
    assert_eq!(killed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_on_the_same_data_dir_exits() {
    let cl = Cluster::start(0, 3000);
    let _ = cl.client().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = std::process::Command::new(bin("rlhf-coordinator"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(cl.data_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("in use by another coordinator"), "{err}");
}

/// 150 PPO iterations, reward and critic on cpu-1, checkpoints every 10.
fn ppo_with_remote_roles() -> String {
    let f = fixtures();
    let p = |s: &str| f.join(s).display().to_string();
    format!(
        "version = 1\nkind = \"ppo\"\nseed = 4\n[model]\npath = \"{}\"\nmax_length = 128\n[peft]\nmethod = \"lora\"\nr = 4\n\
         [data]\ntask = \"eprstmt\"\ntrain = \"{}\"\n[ppo]\niterations = 150\nrollout_batch = 8\nminibatch = 4\n\
         max_new_tokens = 3\nreward = {{ kind = \"label\" }}\n[checkpoint]\nevery = 10\n\
         [placement]\ntrainer = \"cpu-0\"\nreward = \"cpu-1\"\ncritic = \"cpu-1\"\n",
        p("tiny-llama"),
        p("fewclue/eprstmt/train.json")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ppo_job_whose_role_host_dies_is_requeued_and_finishes() {
    let mut cl = Cluster::start(2, 3000);
    cl.wait_workers(2).await;
    let mut c = cl.client().await;
    let id = submit_spec(&mut c, ppo_with_remote_roles()).await;
    wait_job(&mut c, &id, std::time::Duration::from_secs(60), |j| j.progress.as_ref().is_some_and(|p| p.step >= 15))
        .await;
    cl.workers[1].kill().unwrap();
    cl.workers[1].wait().unwrap();
    cl.add_worker("cpu-1");
    let job = wait_job(&mut c, &id, std::time::Duration::from_secs(120), is_terminal).await;
    assert_eq!(state_name(job.state), "succeeded", "{job:?}\n{}", cl.logs());
    assert!(job.attempts >= 2, "{job:?}");
    let logs = c.get_job_logs(GetJobLogsRequest { job_id: id, ..Default::default() }).await.unwrap().into_inner();
    assert!(
        logs.events.iter().any(|e| e.state == JobState::Queued as i32 && e.message.contains("requeued")),
        "{:?}",
        logs.events
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ppo_job_survives_its_trainer_and_the_coordinator_killed_with_remote_roles() {
    let mut cl = Cluster::start(2, 3000);
    cl.wait_workers(2).await;
    let mut c = cl.client().await;
    let spec = ppo_with_remote_roles();
    let id = submit_spec(&mut c, spec).await;
    wait_job(&mut c, &id, std::time::Duration::from_secs(60), |j| j.progress.as_ref().is_some_and(|p| p.step >= 15))
        .await;
    // kill -9 the trainer, then within the lease the coordinator, and restart both.
    cl.workers[0].kill().unwrap();
    cl.workers[0].wait().unwrap();
    cl.kill_coordinator();
    cl.start_coordinator();
    cl.add_worker("cpu-0");
    let mut c = cl.client().await;
    let job = wait_job(&mut c, &id, std::time::Duration::from_secs(120), is_terminal).await;
    assert_eq!(state_name(job.state), "succeeded", "{job:?}\n{}", cl.logs());
    let m = read_metrics(std::path::Path::new(&job.output_dir));
    assert_eq!(m.last().unwrap()["step"].as_u64(), Some(150));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_fails_and_frees_its_worker() {
    let cl = Cluster::start(1, 3000);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let spec = format!("{}\n[placement]\ndeadline_s = 2\n", sft_job(100_000, 0));
    let id = submit_spec(&mut c, spec).await;
    let job = wait_job(&mut c, &id, std::time::Duration::from_secs(30), is_terminal).await;
    assert_eq!(state_name(job.state), "failed", "{job:?}");
    assert!(job.reason.contains("deadline_s = 2"), "{}", job.reason);
    // The worker is free for the next job.
    let next = submit_spec(&mut c, sft_job(5, 0)).await;
    let next = wait_job(&mut c, &next, std::time::Duration::from_secs(60), is_terminal).await;
    assert_eq!(state_name(next.state), "succeeded", "{next:?}");
}
