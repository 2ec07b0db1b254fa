//! Fuzzing what peers send: job files (through the parser and validation)
//! and worker messages (decoded from random and mutated bytes, then handed
//! to a live scheduler). Nothing may panic or stop the scheduler, and every
//! refused job file names its field. Each runs for `RLHF_FUZZ_SECS` seconds
//! (default 30; scripts/test.sh runs both, about a minute).

use std::time::{Duration, Instant};

use prost::Message;
use rand::{Rng, SeedableRng};
use rlhf_common::JobSpec;
use rlhf_proto::*;
use tokio::sync::{mpsc, oneshot};

use super::{Command, Config, Handle};

fn budget() -> Duration {
    let secs = std::env::var("RLHF_FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30u64);
    Duration::from_secs(secs)
}

fn seeds() -> Vec<String> {
    let root = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"),
    )
    .join("..");
    let mut out = Vec::new();
    for dir in ["examples", "deploy/placement"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                out.push(std::fs::read_to_string(e.path()).unwrap());
            }
        }
    }
    out
}

/// Pieces a mutation splices in: field names, odd values, table headers.
const PIECES: &[&str] = &[
    "\n[placement]\n",
    "\ndata_parallel = 18446744073709551615\n",
    "\nrollout = [\"\", \"*\", \"a\", \"a\"]\n",
    "\nname = \"../../x\"\n",
    " = -1\n",
    " = 1e309\n",
    " = nan\n",
    " = \"\u{202e}\u{0}\"\n",
    "\n[[stage]]\nname = \"s\"\nkind = \"ppo\"\n",
    "\nmax_attempts = 0\n",
    "\nrollout_ahead = 7\n",
    "\nmethod = \"full\"\n",
    "\n[ppo]\niterations = 0\n",
    "\nreward = { kind = \"model\" }\n",
    "\ntop_p = 2.0\n",
    "\n[model]\npath = \"\"\n",
    "{{{{",
    "\"",
    "[",
    "\nversion = 2\n",
];

fn mutate(rng: &mut impl Rng, text: &str) -> String {
    let mut b = text.as_bytes().to_vec();
    for _ in 0..rng.gen_range(1..6) {
        let at = if b.is_empty() { 0 } else { rng.gen_range(0..b.len()) };
        match rng.gen_range(0..5) {
            0 if !b.is_empty() => b[at] = rng.gen(),
            1 => b.splice(at..at, PIECES[rng.gen_range(0..PIECES.len())].bytes()).for_each(drop),
            2 if !b.is_empty() => {
                let end = (at + rng.gen_range(1..64)).min(b.len());
                b.drain(at..end);
            }
            3 => b.truncate(at),
            _ => {
                let end = (at + rng.gen_range(1..200)).min(b.len());
                let dup = b[at..end].to_vec();
                b.splice(at..at, dup).for_each(drop);
            }
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

#[test]
fn job_files_never_panic_the_parser_and_refusals_name_a_field() {
    let seeds = seeds();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (t0, mut n, mut refused) = (Instant::now(), 0u64, 0u64);
    while t0.elapsed() < budget() {
        let seed = &seeds[rng.gen_range(0..seeds.len())];
        let text = mutate(&mut rng, seed);
        let r = std::panic::catch_unwind(|| match JobSpec::from_toml(&text) {
            Ok(spec) => {
                // What the coordinator does with an accepted one.
                let _ = spec.check_paths(&[]);
                let again = JobSpec::from_toml(&spec.to_toml());
                assert!(again.is_ok(), "an accepted spec does not round-trip: {:?}\n{text}", again.err());
                true
            }
            Err(e) => {
                assert!(!e.field.is_empty() && !e.msg.is_empty(), "a refusal without a field or cause: {e:?}\n{text}");
                false
            }
        });
        match r {
            Ok(accepted) => refused += u64::from(!accepted),
            Err(_) => panic!("the job-file parser panicked on:\n{text}"),
        }
        n += 1;
    }
    eprintln!("job files: {n} mutants, {refused} refused with a field, none panicked");
    assert!(n > 100);
}

/// A worker message with random fields, often naming a real job.
fn random_message(rng: &mut impl Rng, job: &str) -> WorkerMessage {
    let id = if rng.gen_bool(0.7) { job.to_string() } else { format!("j{}", rng.gen::<u16>()) };
    let big = |rng: &mut rand::rngs::StdRng| if rng.gen_bool(0.3) { u32::MAX } else { rng.gen_range(0..4) };
    let mut r = rand::rngs::StdRng::seed_from_u64(rng.gen());
    let tensor = |r: &mut rand::rngs::StdRng| TensorData {
        name: "t".into(),
        shape: vec![r.gen_range(-2..5), r.gen_range(0..3)],
        f32: (0..r.gen_range(0..8)).map(|_| r.gen()).collect(),
        i64: Vec::new(),
    };
    let msg = match rng.gen_range(0..7) {
        0 => worker_message::Msg::Heartbeat(Heartbeat {
            jobs: Some(WorkerJobs {
                running: vec![id.clone()],
                roles: vec![HostedRoles { job_id: id.clone(), roles: vec![r.gen_range(0..6)], target: big(&mut r) }],
                ranks: vec![RankJob { job_id: id.clone(), rank: big(&mut r), world: big(&mut r) }],
            }),
        }),
        1 => worker_message::Msg::Progress(TaskProgress {
            job_id: id,
            progress: Some(Progress { stage: "s".into(), step: r.gen(), total: r.gen(), metrics_json: "{".into() }),
            attempt: r.gen_range(0..3),
        }),
        2 => worker_message::Msg::Result(TaskResult {
            job_id: id,
            ok: r.gen(),
            reason: "r".into(),
            cancelled: r.gen(),
            attempt: r.gen_range(0..3),
            retry: r.gen(),
        }),
        3 => worker_message::Msg::RoleCall(RoleCall {
            job_id: id,
            call_id: r.gen(),
            op: r.gen_range(-1..10),
            path: "/etc".into(),
            tensors: vec![tensor(&mut r)],
            role: r.gen_range(-1..6),
            target: big(&mut r),
        }),
        4 => worker_message::Msg::RoleReply(RoleReply {
            job_id: id,
            call_id: r.gen(),
            error: String::new(),
            tensors: vec![tensor(&mut r)],
            role: r.gen_range(-1..6),
            target: big(&mut r),
            lost: r.gen(),
        }),
        5 => worker_message::Msg::Collective(Collective {
            job_id: id,
            round: r.gen_range(0..3),
            rank: big(&mut r),
            world: big(&mut r),
            op: r.gen_range(-1..4),
            tensors: vec![tensor(&mut r), tensor(&mut r)],
            payload: vec![1, 2, 3],
        }),
        _ => worker_message::Msg::Register(Register::default()),
    };
    WorkerMessage { msg: Some(msg) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_messages_never_stop_the_scheduler() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Handle::spawn(Config {
        data_dir: tmp.path().to_path_buf(),
        lease: Duration::from_secs(60),
        allow_read: Vec::new(),
        fail_unplaceable: false,
    })
    .unwrap();
    let spec = "version = 1\nkind = \"sft\"\n[model]\npath = \"/m\"\n[peft]\nmethod = \"lora\"\n[data]\ntask = \"eprstmt\"\ntrain = \"/t.json\"\n[placement]\ndata_parallel = 2\n";
    let (job, _) = h.submit(spec.into(), None, "admin".into()).await.unwrap();
    // Two fuzzing workers, so the data-parallel job runs on them.
    let mut streams = Vec::new();
    for w in ["w1", "w2"] {
        let (tx, rx) = mpsc::channel(1 << 16);
        let reg = Register {
            worker_id: w.into(),
            name: w.into(),
            session_key: format!("{w}-key-0123456789abcdef"),
            ..Default::default()
        };
        let (accepted, verdict) = oneshot::channel();
        h.send(Command::Connected { reg, tx, conn: 1, accepted }).await;
        verdict.await.unwrap().unwrap();
        streams.push(rx);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let (t0, mut n, mut decoded) = (Instant::now(), 0u64, 0u64);
    while t0.elapsed() < budget() {
        let mut bytes = random_message(&mut rng, &job.id).encode_to_vec();
        // Half the time, damage the encoding.
        if rng.gen_bool(0.5) && !bytes.is_empty() {
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
            }
        }
        if let Ok(WorkerMessage { msg: Some(msg) }) = WorkerMessage::decode(bytes.as_slice()) {
            let worker = if rng.gen() { "w1" } else { "w2" };
            h.send(Command::Message { worker: worker.into(), conn: 1, msg }).await;
            decoded += 1;
        }
        n += 1;
        if n % 256 == 0 {
            for s in &mut streams {
                while s.try_recv().is_ok() {}
            }
            h.list().await.expect("the scheduler stopped");
        }
    }
    h.get(job.id.clone()).await.expect("the scheduler stopped");
    eprintln!("worker messages: {n} sent ({decoded} decoded), the scheduler still answers");
    assert!(n > 1000);
}
