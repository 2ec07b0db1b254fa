//! The deploy files as their engines read them: the systemd units pass
//! `systemd-analyze verify` (Debian's systemd; scripts/test.sh installs it
//! when missing) with ExecStart pointed at the binaries this build made, and
//! a unit with a bad key does not.

use std::process::Command;

use rlhf_tests::*;

/// `systemd-analyze verify` of `unit` (a file name in `dir`): its output.
fn verify(dir: &std::path::Path, unit: &str) -> String {
    let out = Command::new("systemd-analyze")
        .args(["verify", &format!("./{unit}")])
        .current_dir(dir)
        .output()
        .expect("systemd-analyze (Debian's systemd)");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_systemd_units_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let bin_dir = bin("rlhf-worker").parent().unwrap().to_path_buf();
    let src = workspace_root().join("deploy/systemd");
    for (file, unit) in
        [("rlhf-coordinator.service", "rlhf-coordinator.service"), ("rlhf-worker@.service", "rlhf-worker@0.service")]
    {
        let text =
            std::fs::read_to_string(src.join(file)).unwrap().replace("/usr/local/bin", &bin_dir.display().to_string());
        std::fs::write(tmp.path().join(unit), &text).unwrap();
        let out = verify(tmp.path(), unit);
        assert!(out.trim().is_empty(), "{file}: {out}");
        // The check can fail: the same unit with an unknown key is reported.
        std::fs::write(tmp.path().join("bogus.service"), text.replace("[Service]", "[Service]\nBogusKey=1")).unwrap();
        assert!(verify(tmp.path(), "bogus.service").contains("Unknown key 'BogusKey'"), "{file}");
    }
}

/// A tool of the venv `RLHF_PY` belongs to (scripts/setup-bench.sh installs
/// hadolint and kubernetes-validate there; scripts/test.sh runs it).
fn venv_tool(name: &str) -> std::path::PathBuf {
    let py = std::env::var("RLHF_PY").expect("RLHF_PY (scripts/test.sh sets it)");
    let tool = std::path::Path::new(&py).parent().unwrap().join(name);
    assert!(tool.exists(), "{} missing: run scripts/setup-bench.sh", tool.display());
    tool
}

fn run(cmd: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{}: {e}", cmd.display()));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The Containerfile: hadolint finds nothing (and does find a planted
/// fault); every file it copies from the repo exists; every path it copies
/// out of the build stage exists after scripts/setup.sh, mapped to this
/// machine's venv and target dir; and every library the binaries load
/// comes from what it copies or from Debian's libc6, libstdc++6 and
/// libgcc-s1, which its bookworm-slim runtime has.
#[test]
fn the_container_recipe_lints_and_copies_what_the_build_makes() {
    let root = workspace_root();
    let file = root.join("deploy/container/Containerfile");
    let text = std::fs::read_to_string(&file).unwrap();
    let hadolint = venv_tool("hadolint");
    let (ok, out) = run(&hadolint, &[file.to_str().unwrap()]);
    assert!(ok && out.trim().is_empty(), "hadolint: {out}");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("Containerfile");
    std::fs::write(&bad, format!("{text}RUN cd /tmp && ls\n")).unwrap();
    let (ok, out) = run(&hadolint, &[bad.to_str().unwrap()]);
    assert!(!ok && out.contains("DL3003"), "a planted `cd` was not reported: {out}");

    // /opt/rlhfd/venv and /opt/rlhfd/target in the image are this build's
    // venv and cargo target dir.
    let venv =
        std::path::PathBuf::from(std::env::var("RLHF_PY").unwrap()).parent().unwrap().parent().unwrap().to_path_buf();
    let target = bin("rlhf-worker").parent().unwrap().parent().unwrap().to_path_buf();
    let local = |p: &str| {
        let p = p.trim_end_matches('/');
        if let Some(rest) = p.strip_prefix("/opt/rlhfd/venv") {
            Some(std::path::PathBuf::from(format!("{}{rest}", venv.display())))
        } else {
            p.strip_prefix("/opt/rlhfd/target")
                .map(|rest| std::path::PathBuf::from(format!("{}{rest}", target.display())))
        }
    };
    let (mut from_repo, mut from_build) = (0, 0);
    for line in text.lines().filter(|l| l.starts_with("COPY ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).collect();
        let build = words[0] == "--from=build";
        let srcs = &words[usize::from(build)..words.len() - 1];
        for src in srcs {
            if !build {
                assert!(root.join(src).exists(), "COPY {src}: not in the repo");
                from_repo += 1;
            } else if src.starts_with("/opt/rlhfd/nccl") {
                // Made by the build stage's RUN: a link to the wheel's NCCL.
                let link = text.split_whitespace().skip_while(|w| *w != "-s").nth(1).unwrap();
                assert!(local(link).unwrap().exists(), "{link}: no NCCL in the venv");
            } else {
                let p = local(src).unwrap_or_else(|| panic!("COPY --from=build {src}: not under /opt/rlhfd"));
                assert!(p.exists(), "COPY --from=build {src}: {} does not exist after setup", p.display());
                from_build += 1;
            }
        }
    }
    assert!(from_repo >= 8 && from_build >= 5, "{from_repo} repo paths, {from_build} build paths");

    let copied =
        [venv.join("lib/python3.11/site-packages/torch/lib"), venv.join("lib/python3.11/site-packages/nvidia")];
    for b in ["rlhf-coordinator", "rlhf-worker", "rlhfctl"] {
        let out = Command::new("ldd").arg(bin(b)).env_remove("LD_LIBRARY_PATH").output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in out.lines().filter(|l| l.contains("=>")) {
            let path = line.split("=>").nth(1).unwrap().split_whitespace().next().unwrap_or("not");
            assert!(path.starts_with('/'), "{b}: {line}");
            let canon = std::fs::canonicalize(path).unwrap();
            if copied.iter().any(|c| canon.starts_with(std::fs::canonicalize(c).unwrap())) {
                continue;
            }
            // Debian's /lib is /usr/lib (merged /usr); dpkg knows one of the two.
            let usr = format!("/usr{path}");
            let (found, owner) = run(std::path::Path::new("dpkg"), &["-S", path]);
            let owner = if found { owner } else { run(std::path::Path::new("dpkg"), &["-S", &usr]).1 };
            let package = owner.split(':').next().unwrap_or("").to_string();
            assert!(["libc6", "libstdc++6", "libgcc-s1"].contains(&package.as_str()), "{b} loads {path} from {owner}");
        }
    }
}

/// The Kubernetes manifest against the API schemas of Kubernetes 1.33
/// (kubernetes-validate, strict: unknown fields fail), which also fails a
/// planted unknown field; and it runs the image the Containerfile makes:
/// its commands are binaries the image has.
#[test]
fn the_kubernetes_manifest_validates_and_runs_the_image_we_build() {
    let root = workspace_root();
    let file = root.join("deploy/k8s/rlhfd.yaml");
    let tool = venv_tool("kubernetes-validate");
    let (ok, out) = run(&tool, &["-k", "1.33.0", "--strict", file.to_str().unwrap()]);
    assert!(ok, "kubernetes-validate: {out}");
    for kind in ["namespace", "persistentvolumeclaim", "deployment", "service", "statefulset"] {
        assert!(out.contains(&format!("passed for resource {kind}/")), "{kind}: {out}");
    }
    let text = std::fs::read_to_string(&file).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("rlhfd.yaml");
    std::fs::write(&bad, text.replace("replicas: 1 ", "replica: 1 ")).unwrap();
    let (ok, out) = run(&tool, &["-k", "1.33.0", "--strict", bad.to_str().unwrap()]);
    assert!(!ok && out.contains("replica"), "a planted unknown field passed: {out}");

    let recipe = std::fs::read_to_string(root.join("deploy/container/Containerfile")).unwrap();
    let build = std::fs::read_to_string(root.join("deploy/container/build.sh")).unwrap();
    assert!(text.contains("image: rlhfd:0.1.0") && build.contains("tag=${1:-rlhfd:0.1.0}"));
    let mut commands = 0;
    for line in text.lines().filter(|l| l.trim_start().starts_with("command:")) {
        let path = line.split('"').nth(1).unwrap();
        let name = path.strip_prefix("/usr/local/bin/").unwrap_or_else(|| panic!("{line}"));
        assert!(
            recipe.lines().any(|l| l.starts_with("COPY --from=build") && l.contains(&format!("/{name} "))),
            "{name}"
        );
        commands += 1;
    }
    assert_eq!(commands, 2);
}

/// The containers of the manifest's Deployment and StatefulSet, as JSON:
/// kind, command, args, env values, and the kind of each probe.
fn manifest_containers(file: &std::path::Path) -> Vec<serde_json::Value> {
    let py = std::env::var("RLHF_PY").expect("RLHF_PY (scripts/test.sh sets it)");
    let script = "import json, sys, yaml\n\
        out = []\n\
        for d in yaml.safe_load_all(open(sys.argv[1])):\n\
        \x20   if d and d['kind'] in ('Deployment', 'StatefulSet'):\n\
        \x20       for c in d['spec']['template']['spec']['containers']:\n\
        \x20           probes = {k: sorted(set(c[k]) & {'grpc', 'tcpSocket', 'httpGet', 'exec'}) for k in ('readinessProbe', 'livenessProbe') if k in c}\n\
        \x20           env = {e['name']: e.get('value') for e in c.get('env', [])}\n\
        \x20           out.append({'kind': d['kind'], 'command': c['command'], 'args': c.get('args', []), 'env': env, 'probes': probes})\n\
        print(json.dumps(out))\n";
    let out = Command::new(py).args(["-c", script]).arg(file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A coordinator and a worker started from a deploy file's own command
/// lines, with its paths and addresses mapped to this machine.
struct Local {
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
    port: u16,
    children: Vec<std::process::Child>,
}

impl Local {
    /// Temp dirs, an openssl CA and a localhost certificate, a free port.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        tls_certificates(dir.path());
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        Local { dir, data, port, children: Vec::new() }
    }

    /// `arg` with each `(from, to)` of the file's names replaced; `to` may
    /// say `{data}`, `{dir}` or `{port}`.
    fn map(&self, arg: &str, names: &[(&str, &str)]) -> String {
        names.iter().fold(arg.to_string(), |a, (from, to)| {
            let to = to
                .replace("{data}", &self.data.display().to_string())
                .replace("{dir}", &self.dir.path().display().to_string())
                .replace("{port}", &self.port.to_string());
            a.replace(from, &to)
        })
    }

    /// Starts `exe` (a path under /usr/local/bin in the file) with `args`
    /// and `env`, logging to `<dir>/<log>.log`; for the coordinator, waits
    /// until it has written worker.token.
    fn start(&mut self, exe: &str, args: &[String], env: &[(String, String)], log: &str) {
        let name = exe.strip_prefix("/usr/local/bin/").unwrap_or_else(|| panic!("{exe}"));
        let file = std::fs::File::create(self.dir.path().join(format!("{log}.log"))).unwrap();
        let child = Command::new(bin(name))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RLHF_QUIET", "1")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        self.children.push(child);
        if name == "rlhf-coordinator" {
            let t = std::time::Instant::now();
            while !self.data.join("worker.token").exists() {
                assert!(t.elapsed() < std::time::Duration::from_secs(30), "no worker.token:\n{}", self.logs());
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }

    fn logs(&self) -> String {
        let logs = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"));
        logs.map(|e| format!("--- {}\n{}", e.path().display(), std::fs::read_to_string(e.path()).unwrap_or_default()))
            .collect()
    }

    /// Whether a worker named `name` is alive within 30 s, as rlhfctl sees
    /// it over TLS (`https://localhost:<port>`, the CA, the admin token).
    fn registered(&self, name: &str) -> bool {
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(30) {
            let out = Command::new(bin("rlhfctl"))
                .args(["workers", "--json"])
                .env("RLHF_COORDINATOR", format!("https://localhost:{}", self.port))
                .env("RLHF_TLS_CA", self.dir.path().join("ca.pem"))
                .env("RLHF_DATA_DIR", &self.data)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            if text.contains(&format!("\"{name}\"")) && text.contains("\"alive\": true") {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        false
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The manifest's own command lines and env, with only its cluster names
/// mapped to this machine (the volume and secret paths to temp dirs, the
/// Service to localhost, `$(POD_NAME)` to rlhf-worker-0, cuda:0 to cpu):
/// the coordinator starts with TLS on the data volume, the worker reaches
/// it with the secret's CA and the volume's worker.token and registers
/// under its pod name, and the port the probes check takes connections.
/// The probes are TCP: the kubelet's gRPC probe speaks plain text, which
/// this TLS port does not answer (tests/tests/tls.rs).
#[test]
fn the_kubernetes_manifest_command_lines_start_a_working_cluster() {
    let containers = manifest_containers(&workspace_root().join("deploy/k8s/rlhfd.yaml"));
    let names = [
        ("/var/lib/rlhfd", "{data}"),
        ("/etc/rlhfd-tls/tls.crt", "{dir}/server.pem"),
        ("/etc/rlhfd-tls/tls.key", "{dir}/server.key"),
        ("/etc/rlhfd-tls/ca.crt", "{dir}/ca.pem"),
        ("0.0.0.0:50051", "0.0.0.0:{port}"),
        ("https://rlhf-coordinator.rlhfd.svc:50051", "https://localhost:{port}"),
        ("$(POD_NAME)", "rlhf-worker-0"),
        ("cuda:0", "cpu"),
    ];
    let mut local = Local::new();
    for kind in ["Deployment", "StatefulSet"] {
        let c = containers.iter().find(|c| c["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"));
        for probe in c["probes"].as_object().unwrap().values() {
            assert_eq!(probe, &serde_json::json!(["tcpSocket"]), "{kind}: {c}");
        }
        let args: Vec<String> =
            c["args"].as_array().unwrap().iter().map(|a| local.map(a.as_str().unwrap(), &names)).collect();
        let changed =
            c["args"].as_array().unwrap().iter().zip(&args).filter(|(a, m)| a.as_str() != Some(m.as_str())).count();
        assert!(changed >= 3, "{kind}: the manifest's paths and addresses changed? {args:?}");
        let mut env: Vec<(String, String)> = vec![("POD_NAME".into(), "rlhf-worker-0".into())];
        for (k, v) in c["env"].as_object().unwrap() {
            env.extend(v.as_str().map(|v| (k.clone(), v.to_string())));
        }
        local.start(c["command"][0].as_str().unwrap(), &args, &env, kind);
    }
    assert!(local.registered("rlhf-worker-0"), "the worker did not register under its pod name:\n{}", local.logs());
    // What the tcpSocket probes do.
    assert!(std::net::TcpStream::connect(("127.0.0.1", local.port)).is_ok());
}

/// The systemd units' own ExecStart and Environment lines (variables and
/// %i / %H expanded as systemd does), with only their paths mapped to this
/// machine and cuda:0 to cpu: the coordinator unit serves TLS on every
/// interface, and the worker unit's defaults reach it and register.
#[test]
fn the_systemd_units_command_lines_start_a_working_cluster() {
    let names = [
        ("/var/lib/rlhfd", "{data}"),
        ("/etc/rlhfd/tls.crt", "{dir}/server.pem"),
        ("/etc/rlhfd/tls.key", "{dir}/server.key"),
        ("/etc/rlhfd/ca.crt", "{dir}/ca.pem"),
        ("0.0.0.0:50051", "0.0.0.0:{port}"),
        ("localhost:50051", "localhost:{port}"),
        ("cuda:0", "cpu"),
    ];
    let mut local = Local::new();
    for unit in ["rlhf-coordinator.service", "rlhf-worker@.service"] {
        let text = std::fs::read_to_string(workspace_root().join("deploy/systemd").join(unit)).unwrap();
        let spec = |s: &str| s.replace("%i", "0").replace("%H", "node");
        let mut env: Vec<(String, String)> = Vec::new();
        for line in text.lines().filter_map(|l| l.strip_prefix("Environment=")) {
            let (k, v) = line.split_once('=').unwrap();
            env.push((k.to_string(), local.map(&spec(v), &names)));
        }
        let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
        let words: Vec<String> = exec
            .split_whitespace()
            .map(|w| {
                let w = env.iter().fold(spec(w), |w, (k, v)| w.replace(&format!("${{{k}}}"), v));
                assert!(!w.contains("${"), "{unit}: {w} is not set in the unit");
                local.map(&w, &names)
            })
            .collect();
        local.start(&words[0], &words[1..], &env, unit);
    }
    assert!(local.registered("node-gpu0"), "the worker unit did not reach the coordinator unit:\n{}", local.logs());
}
