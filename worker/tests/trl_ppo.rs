//! PPO on a file in TRL's formats (conversational prompts through the chat
//! template, an `answer` column) with several reward functions: an `http`
//! scorer started by the test (bearer token checked, rows carrying the
//! prompt, completion and columns) and `exact`, summed with weights; the
//! http reward rises, each function's mean is logged; a scorer that fails
//! stops the job with its URL and status.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::jobs::{job, LORA};
use rlhf_worker::train::run::run_job;
use serde_json::{json, Value};
use tch::Device;

const TOKEN: &str = "s3cret-token";

/// A one-route HTTP scorer on 127.0.0.1: 1.0 for a completion starting
/// with a digit, else 0. Answers 401 without the token, and `status`
/// instead of 200 when given. Returns its URL and a request counter.
fn scorer(status: Option<u16>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/score", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            seen.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut len, mut auth) = (0usize, String::new());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap_or((l, ""));
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap(),
                    "authorization" => auth = v.trim().to_string(),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let req: Value = serde_json::from_slice(&body).unwrap();
            let (code, answer) = if auth != format!("Bearer {TOKEN}") {
                (401, json!({"error": "bad token"}))
            } else if let Some(s) = status {
                (s, json!({"error": "down"}))
            } else {
                let rewards: Vec<f64> = req["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        assert!(r["prompt"].is_array() && r["answer"].is_string(), "row lacks its columns: {r}");
                        let c = r["completion"].as_str().unwrap();
                        f64::from(u8::from(c.starts_with(|ch: char| ch.is_ascii_digit())))
                    })
                    .collect();
                (200, json!({ "rewards": rewards }))
            };
            let text = answer.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (url, count)
}

fn ppo_toml(sft: Option<&Path>, url: &str, token_file: &Path, iterations: usize) -> String {
    let merge = sft.map(|p| format!("merge_adapters = [{p:?}]\n")).unwrap_or_default();
    format!(
        r#"version = 1
kind = "ppo"
seed = 4
[model]
path = "tiny-qwen2-chat"
dtype = "f32"
max_length = 128
{merge}{LORA}
[data]
train = "data/arith_sft.jsonl"
[ppo]
iterations = {iterations}
rollout_batch = 16
minibatch = 8
ppo_epochs = 4
max_new_tokens = 2
temperature = 0.5
kl_coef = 0.01
lr = 1e-2
critic_lr = 1e-2
[[ppo.rewards]]
kind = "http"
url = "{url}"
token_file = {token_file:?}
timeout_ms = 5000
retries = 1
[[ppo.rewards]]
kind = "exact"
weight = 0.5
"#
    )
}

/// SFT on the sums: the policy answers with a digit, often.
fn sft(dir: &Path) -> std::path::PathBuf {
    let text = format!(
        r#"version = 1
kind = "sft"
seed = 3
[model]
path = "tiny-qwen2-chat"
dtype = "f32"
max_length = 128
{LORA}
[data]
train = "data/arith_sft.jsonl"
[train]
max_steps = 60
batch_size = 8
lr = 1e-2
warmup_steps = 5
"#
    );
    run_job(&job(&text), dir, Device::Cpu).unwrap();
    dir.join("adapter")
}

fn series(m: &[Value], key: &str) -> Vec<f64> {
    m.iter().filter_map(|r| r.get(key).and_then(Value::as_f64)).collect()
}

#[test]
fn ppo_with_an_http_and_an_exact_reward_raises_the_http_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let (url, calls) = scorer(None);
    let out = tmp.path().join("ppo");
    let adapter = sft(&tmp.path().join("sft"));
    run_job(&job(&ppo_toml(Some(&adapter), &url, &token, 25)), &out, Device::Cpu).unwrap();
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let m: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let http = series(&m, "reward_http");
    let exact = series(&m, "reward_exact");
    let total = series(&m, "reward_mean");
    assert_eq!((http.len(), exact.len(), total.len()), (25, 25, 25));
    for i in 0..25 {
        assert!((total[i] - (http[i] + 0.5 * exact[i])).abs() < 1e-5, "reward_mean is the weighted sum: {i}");
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&http[20..]) > mean(&http[..5]) + 0.15, "http reward did not rise: {http:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 25, "one request of 16 rows per iteration");
}

#[test]
fn a_failing_scorer_stops_the_job_naming_its_url_and_status() {
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "wrong").unwrap();
    let (url, _) = scorer(None);
    let text = ppo_toml(None, &url, &token, 2);
    let e = run_job(&job(&text), &tmp.path().join("a"), Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("status 401"), "{e}");
    std::fs::write(&token, TOKEN).unwrap();
    let (url, calls) = scorer(Some(503));
    let text = ppo_toml(None, &url, &token, 2);
    let e = run_job(&job(&text), &tmp.path().join("b"), Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("no answer after 2 tries") && e.contains("status 503"), "{e}");
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one try and one retry");
}
