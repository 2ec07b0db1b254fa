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
    let id = c
        .submit_job(SubmitJobRequest { spec_toml: sft_job(5, 0), request_id: String::new() })
        .await
        .unwrap()
        .into_inner()
        .job_id;
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
