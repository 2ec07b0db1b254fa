//! The dashboard as a person sees it, through headless Chromium (Debian's,
//! installed by scripts/test.sh): while a PPO job runs, the index lists it
//! as running and the job page draws curves with several points; a
//! screenshot is saved (its path is printed); cancelling needs a token,
//! and so does reading from anywhere but loopback.

use std::process::Command;
use std::time::Duration;

use rlhf_tests::*;

fn chromium(args: &[&str]) -> String {
    // (No virtual-time budget: the job page's event stream never idles.)
    let out = Command::new("timeout")
        .args(["60", "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        .args(args)
        .output()
        .expect("chromium (scripts/test.sh installs Debian's)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// This machine's address off loopback (the one a route out would use).
fn outside_ip() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("192.0.2.1:9").expect("a route off loopback");
    let ip = s.local_addr().unwrap().ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}");
    ip
}

/// The status line of `GET path` to `addr`, with the bearer `token`.
fn status_line(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> String {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: rlhfd\r\nConnection: close\r\n{auth}\r\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line.trim().to_string()
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_a_running_job_with_its_curves() {
    let http = port();
    let cl = Cluster::start_with(1, 3000, |_| vec!["--http".into(), format!("0.0.0.0:{http}")]);
    cl.wait_workers(1).await;
    let mut c = cl.client().await;
    let f = fixtures();
    let p = |s: &str| f.join(s).display().to_string();
    let spec = format!(
        "version = 1\nkind = \"ppo\"\nname = \"dash-ppo\"\nseed = 4\n[model]\npath = \"{}\"\nmax_length = 128\n[peft]\nmethod = \"lora\"\nr = 4\n\
         [data]\ntask = \"eprstmt\"\ntrain = \"{}\"\n[ppo]\niterations = 3000\nrollout_batch = 8\nminibatch = 4\n\
         max_new_tokens = 3\nreward = {{ kind = \"label\" }}\n",
        p("tiny-llama"),
        p("fewclue/eprstmt/train.json")
    );
    let id = submit_spec(&mut c, spec).await;
    wait_job(&mut c, &id, Duration::from_secs(60), |j| j.progress.as_ref().is_some_and(|p| p.step >= 8)).await;

    let base = format!("http://127.0.0.1:{http}");
    let index = chromium(&["--dump-dom", &base]);
    assert!(index.contains(&id) && index.contains("dash-ppo"), "{index}");
    assert!(index.contains("class=\"state-running\">running<"), "{index}");
    assert!(index.contains("cpu-0"), "{index}");

    let page = chromium(&["--dump-dom", &format!("{base}/jobs/{id}")]);
    let points = |series: &str| {
        page.split(&format!("data-series=\"{series}\" data-points=\""))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    };
    assert!(points("dash-ppo reward_mean") >= 5, "{page}");
    assert!(points("dash-ppo kl") >= 5, "{page}");
    assert!(page.contains("Cancel job"), "{page}");
    let shot = std::env::temp_dir().join("rlhfd-dashboard.png");
    chromium(&["--window-size=1280,1000", &format!("--screenshot={}", shot.display()), &format!("{base}/jobs/{id}")]);
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    eprintln!("dashboard screenshot: {}", shot.display());

    // Off loopback, reading needs a client token.
    let outside = std::net::SocketAddr::new(outside_ip(), http);
    for path in ["/".to_string(), format!("/jobs/{id}"), format!("/jobs/{id}/curves")] {
        assert_eq!(status_line(outside, &path, None), "HTTP/1.1 401 Unauthorized", "{path}");
        assert_eq!(status_line(outside, &path, Some("wrong-token")), "HTTP/1.1 401 Unauthorized", "{path}");
        assert_eq!(status_line(outside, &path, cl.admin_token().as_deref()), "HTTP/1.1 200 OK", "{path}");
    }

    // Cancelling without a token is refused, with it done.
    let post = |token: &str| {
        Command::new("python3")
            .args([
                "-c",
                "import sys,urllib.request as u,urllib.parse as p,urllib.error as e\n\
                 r=u.Request(sys.argv[1],data=p.urlencode({'token':sys.argv[2]}).encode())\n\
                 try: print(u.urlopen(r).status)\n\
                 except e.HTTPError as x: print(x.code)",
                &format!("{base}/jobs/{id}/cancel"),
                token,
            ])
            .output()
            .unwrap()
    };
    assert_eq!(String::from_utf8_lossy(&post("nope").stdout).trim(), "401");
    assert_eq!(String::from_utf8_lossy(&post(&cl.admin_token().unwrap()).stdout).trim(), "200");
    let j = wait_job(&mut c, &id, Duration::from_secs(30), is_terminal).await;
    assert_eq!(state_name(j.state), "cancelled");
}
