//! The web dashboard on the coordinator's HTTP port: `/` lists jobs and
//! workers; `/jobs/<id>` shows a job's events (where its roles run), its
//! curves as server-rendered SVG that redraw as records arrive (server-sent
//! events), its report and eval predictions, and a cancel button. Nothing
//! comes from outside the binary. Reading needs a client token, except from
//! loopback (read-only); cancelling always needs one.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Form, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use crate::auth::Tokens;
use crate::scheduler::Handle;
use crate::state::JobState;

#[derive(Clone)]
pub struct Dash {
    pub sched: Handle,
    pub tokens: Arc<Tokens>,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The token of an `Authorization: Bearer <token>` header (the HTTP side's
/// twin of `rlhf_proto::auth::bearer_token`).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, t) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(t.trim())
}

/// The dashboard's routes: the pages behind [`readers_only`], and the
/// cancel form, which checks its own token.
pub fn routes(dash: Dash) -> Router {
    let pages = Router::new()
        .route("/", get(index))
        .route("/jobs/{id}", get(job))
        .route("/jobs/{id}/curves", get(job_curves))
        .route("/jobs/{id}/events", get(job_events))
        .route_layer(middleware::from_fn_with_state(dash.clone(), readers_only));
    pages.route("/jobs/{id}/cancel", post(cancel)).with_state(dash)
}

/// Who reads: a token's client, or anyone on loopback (read-only).
async fn readers_only(
    State(d): State<Dash>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    if peer.ip().is_loopback() || bearer(req.headers()).and_then(|t| d.tokens.client(t)).is_some() {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "a client token is required off loopback\n").into_response()
    }
}

const STYLE: &str = "body{font:14px sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 24px}\
td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left}th{background:#f4f4f4}\
.state-running{color:#06c}.state-succeeded{color:#080}.state-failed{color:#c00}.state-queued{color:#888}\
.curves{display:flex;flex-wrap:wrap;gap:16px}.curve{border:1px solid #ddd;padding:6px}pre{background:#f7f7f7;padding:8px;overflow:auto}";

fn page(title: &str, body: &str, script: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head>\
         <body><h1>{}</h1>{body}<script>{script}</script></body></html>",
        esc(title),
        esc(title)
    ))
}

fn progress_of(progress: &str) -> (String, u64, u64) {
    let p: Value = serde_json::from_str(progress).unwrap_or_default();
    (p["stage"].as_str().unwrap_or("").to_string(), p["step"].as_u64().unwrap_or(0), p["total"].as_u64().unwrap_or(0))
}

async fn index(State(d): State<Dash>) -> Response {
    let (Ok(jobs), Ok(workers)) = (d.sched.list().await, d.sched.workers().await) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the scheduler is not answering\n").into_response();
    };
    let names: std::collections::BTreeMap<String, String> =
        workers.iter().map(|w| (w.id.clone(), w.name.clone())).collect();
    let mut b = String::from("<h2>Jobs</h2><table id=\"jobs\"><tr><th>job</th><th>name</th><th>kind</th><th>state</th><th>stage</th><th>progress</th><th>attempts</th><th>worker</th></tr>");
    for j in jobs.iter().rev() {
        let (stage, step, total) = progress_of(&j.progress);
        let worker = names.get(j.state.worker()).cloned().unwrap_or_else(|| j.state.worker().to_string());
        let _ = write!(
            b,
            "<tr><td><a href=\"/jobs/{id}\">{id}</a></td><td>{}</td><td>{}</td><td class=\"state-{st}\">{st}</td><td>{}</td><td>{step}/{total}</td><td>{}</td><td>{}</td></tr>",
            esc(&j.name),
            esc(&j.kind),
            esc(&stage),
            j.attempts,
            esc(&worker),
            id = esc(&j.id),
            st = j.state.name(),
        );
    }
    b.push_str("</table><h2>Workers</h2><table id=\"workers\"><tr><th>name</th><th>device</th><th>memory</th><th>alive</th><th>last heartbeat</th><th>jobs</th></tr>");
    for w in &workers {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{:.1} GiB</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&w.name),
            esc(&w.device),
            w.memory_bytes as f64 / (1u64 << 30) as f64,
            if w.alive { "yes" } else { "no" },
            w.last_seen_ms,
            esc(&w.running.join(", "))
        );
    }
    b.push_str("</table>");
    page("rlhfd", &b, "setTimeout(()=>location.reload(),2000)").into_response()
}

/// SVG line charts of a job's numeric series, one per (stage, key) worth showing.
fn curves(metrics: &[String]) -> String {
    const KEYS: [&str; 8] =
        ["reward_mean", "kl", "policy_loss", "value_loss", "loss", "rewards_margins", "accuracy", "eval_accuracy"];
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for line in metrics {
        let r: Value = serde_json::from_str(line).unwrap_or_default();
        let stage = r["stage"].as_str().unwrap_or("");
        let step = r["step"].as_f64().unwrap_or(0.0);
        for k in KEYS {
            if let Some(v) = r[k].as_f64().filter(|v| v.is_finite()) {
                let name = if stage.is_empty() { k.to_string() } else { format!("{stage} {k}") };
                match series.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, pts)) => pts.push((step, v)),
                    None => series.push((name, vec![(step, v)])),
                }
            }
        }
    }
    let (w, h, pad) = (320.0, 160.0, 28.0);
    let mut out = String::from("<div class=\"curves\" id=\"curves\">");
    for (name, pts) in &series {
        let (x0, x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
        let (y0, y1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
        let sx = |x: f64| pad + (x - x0) / (x1 - x0).max(1e-12) * (w - 2.0 * pad);
        let sy = |y: f64| h - pad - (y - y0) / (y1 - y0).max(1e-12) * (h - 2.0 * pad);
        let points: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = write!(
            out,
            "<div class=\"curve\"><div>{}</div><svg width=\"{w}\" height=\"{h}\" data-series=\"{}\" data-points=\"{}\">\
             <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#fff\"/>\
             <polyline fill=\"none\" stroke=\"#06c\" stroke-width=\"2\" points=\"{}\"/>\
             <text x=\"2\" y=\"12\" font-size=\"10\">{y1:.4}</text><text x=\"2\" y=\"{}\" font-size=\"10\">{y0:.4}</text>\
             <text x=\"{}\" y=\"{}\" font-size=\"10\">step {x1}</text></svg></div>",
            esc(name),
            esc(name),
            pts.len(),
            points.join(" "),
            h - 4.0,
            w - 70.0,
            h - 4.0,
        );
    }
    out.push_str("</div>");
    out
}

/// The first lines of each eval stage's predictions.jsonl.
fn predictions(job_dir: &std::path::Path) -> String {
    let mut files = vec![job_dir.join("predictions.jsonl")];
    if let Ok(rd) = std::fs::read_dir(job_dir.join("stages")) {
        for e in rd.flatten() {
            files.push(e.path().join("predictions.jsonl"));
        }
    }
    let mut out = String::new();
    for f in files.iter().filter(|f| f.exists()) {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let head: Vec<&str> = text.lines().take(20).collect();
        let _ = write!(out, "<h3>{}</h3><pre>{}</pre>", esc(&f.display().to_string()), esc(&head.join("\n")));
    }
    out
}

async fn job(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    let (Ok(j), Ok((events, metrics, _))) = (d.sched.get(id.clone()).await, d.sched.logs(id.clone(), 0, 100_000).await)
    else {
        return (StatusCode::NOT_FOUND, format!("no job {id}\n")).into_response();
    };
    let (stage, step, total) = progress_of(&j.progress);
    let mut b = format!(
        "<p>state <b id=\"state\" class=\"state-{st}\">{st}</b> · stage {} · step <span id=\"step\">{step}/{total}</span> · attempts {} · {}</p>",
        esc(&stage),
        j.attempts,
        esc(j.state.reason()),
        st = j.state.name()
    );
    b.push_str("<h2>Curves</h2>");
    b.push_str(&curves(&metrics));
    b.push_str("<h2>Events</h2><table>");
    for e in &events {
        let _ = write!(b, "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", e.at_ms, esc(&e.state), esc(&e.message));
    }
    b.push_str("</table>");
    if !j.state.is_terminal() {
        let _ = write!(
            b,
            "<form method=\"post\" action=\"/jobs/{}/cancel\"><input name=\"token\" type=\"password\" placeholder=\"client token\">\
             <button type=\"submit\">Cancel job</button></form>",
            esc(&id)
        );
    }
    let dir = d.sched.job_dir(&id);
    if let Ok(report) = std::fs::read_to_string(dir.join("report.md")) {
        let _ = write!(b, "<h2>Report</h2><pre>{}</pre>", esc(&report));
    }
    let preds = predictions(&dir);
    if !preds.is_empty() {
        let _ = write!(b, "<h2>Eval predictions</h2>{preds}");
    }
    let script = format!(
        "const es=new EventSource('/jobs/{id}/events');es.onmessage=async(e)=>{{const j=JSON.parse(e.data);\
         document.getElementById('state').textContent=j.state;document.getElementById('step').textContent=j.step;\
         const r=await fetch('/jobs/{id}/curves');document.getElementById('curves').outerHTML=await r.text();\
         if(j.done)es.close();}};",
        id = esc(&id)
    );
    page(&format!("job {} ({})", j.name, id), &b, &script).into_response()
}

async fn job_curves(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    match d.sched.logs(id.clone(), 0, 100_000).await {
        Ok((_, metrics, _)) => Html(curves(&metrics)).into_response(),
        Err(_) => (StatusCode::NOT_FOUND, format!("no job {id}\n")).into_response(),
    }
}

/// Server-sent events: one per change of the job, until it ends.
async fn job_events(State(d): State<Dash>, Path(id): Path<String>) -> Response {
    let updates = BroadcastStream::new(d.sched.subscribe());
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(updates.filter_map(move |u| u.ok().filter(|j| j.id == id)).map(|j| {
            let (_, step, total) = progress_of(&j.progress);
            let done = matches!(j.state, JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled { .. });
            let data = serde_json::json!({ "state": j.state.name(), "step": format!("{step}/{total}"), "done": done });
            Ok(Event::default().data(data.to_string()))
        }));
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

#[derive(serde::Deserialize)]
pub struct CancelForm {
    token: String,
}

async fn cancel(
    State(d): State<Dash>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CancelForm>,
) -> Response {
    let token = bearer(&headers).map(str::to_string).unwrap_or(f.token);
    let Some(by) = d.tokens.client(&token) else {
        return (StatusCode::UNAUTHORIZED, "cancelling needs a client token\n").into_response();
    };
    match d.sched.cancel(id.clone(), by).await {
        Ok(_) => (StatusCode::SEE_OTHER, [(header::LOCATION, format!("/jobs/{id}"))]).into_response(),
        Err(e) => (StatusCode::FORBIDDEN, format!("{e}\n")).into_response(),
    }
}
