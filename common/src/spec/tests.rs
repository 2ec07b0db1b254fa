use super::*;

const PPO: &str = r#"
version = 1
kind = "ppo"
seed = 3

[model]
path = "models/tiny"

[peft]
method = "lora"
r = 4

[data]
task = "eprstmt"
train = "data/train.json"

[ppo]
iterations = 5
reward = { kind = "label" }
"#;

#[test]
fn a_ppo_job_parses_with_trl_defaults() {
    let spec = JobSpec::from_toml(PPO).unwrap();
    let ppo = spec.ppo.unwrap();
    assert_eq!(
        (ppo.clip, ppo.value_clip, ppo.vf_coef, ppo.gamma, ppo.lam, ppo.kl_coef),
        (0.2, 0.2, 0.1, 1.0, 0.95, 0.05)
    );
    assert_eq!(ppo.reward, Some(RewardSource::Label));
    assert_eq!(spec.peft.unwrap().method, PeftMethod::Lora);
}

#[test]
fn bad_values_name_their_field() {
    let cases = [
        ("iterations = 5", "iterations = 5\nclip = 1.5", "ppo.clip: must be in (0, 1)"),
        ("version = 1", "version = 2", "version: must be 1"),
        ("r = 4", "r = 0", "peft.r: must be positive"),
        ("task = \"eprstmt\"", "task = \"mnli\"", "data.task: unknown task \"mnli\""),
        ("iterations = 5", "iterations = 5\nminibatch = 9", "ppo.minibatch: must be in 1..=8"),
        ("reward = { kind = \"label\" }", "reward = { kind = \"model\" }", "ppo.reward.path: required"),
    ];
    for (from, to, want) in cases {
        let text = PPO.replace(from, to);
        let e = JobSpec::from_toml(&text).unwrap_err().to_string();
        assert!(e.starts_with(want), "{to:?}: got {e:?}, want {want:?}");
    }
}

#[test]
fn unknown_and_missing_fields_are_named() {
    let e = JobSpec::from_toml(&PPO.replace("iterations = 5", "iterations = 5\ncliip = 0.1")).unwrap_err();
    assert!(e.field.starts_with("ppo.cliip"), "{e}");
    assert!(e.msg.contains("unknown field `cliip`"), "{e}");
    let e = JobSpec::from_toml(&PPO.replace("[data]", "[dat]")).unwrap_err();
    assert!(e.to_string().contains("dat"), "{e}");
    let e = JobSpec::from_toml(&PPO.replace("train = \"data/train.json\"", "")).unwrap_err();
    assert_eq!(e.field, "data.train");
    let e = JobSpec::from_toml("version = 1\nkind = \"sft\"\n").unwrap_err();
    assert!(e.msg.contains("model"), "{e}");
}

#[test]
fn pipeline_stages_inherit_and_validate() {
    let text = r#"
version = 1
kind = "pipeline"
[model]
init = { preset = "tiny", corpus = "c.txt" }
[data]
task = "eprstmt"
train = "t.json"
[peft]
method = "ssf"
[[stage]]
name = "pretrain"
kind = "pretrain"
data = { train = "c.txt" }
[[stage]]
name = "sft"
kind = "sft"
[[stage]]
name = "ppo"
kind = "ppo"
ppo = { reward = { kind = "model" }, clip = 0.1 }
"#;
    let spec = JobSpec::from_toml(text).unwrap();
    let sft = spec.stage_job(&spec.stages[1]);
    assert_eq!(sft.kind, JobKind::Sft);
    assert_eq!(sft.peft.as_ref().unwrap().method, PeftMethod::Ssf);
    assert_eq!(sft.data.unwrap().task.as_deref(), Some("eprstmt"));
    let bad = text.replace("clip = 0.1", "clip = 0.0");
    let e = JobSpec::from_toml(&bad).unwrap_err();
    assert_eq!(e.to_string(), "stage[2].ppo.clip: must be in (0, 1), got 0");
    let dup = text.replace("name = \"ppo\"", "name = \"sft\"");
    assert_eq!(JobSpec::from_toml(&dup).unwrap_err().field, "stage[2].name");
}

#[test]
fn resolved_spec_round_trips_through_toml() {
    let spec = JobSpec::from_toml(PPO).unwrap();
    let again = JobSpec::from_toml(&spec.to_toml()).unwrap();
    assert_eq!(spec, again);
}

#[test]
fn relative_paths_resolve_against_the_job_file() {
    let mut spec = JobSpec::from_toml(PPO).unwrap();
    spec.resolve_paths(std::path::Path::new("/jobs"));
    assert_eq!(spec.model.path.as_deref(), Some(std::path::Path::new("/jobs/models/tiny")));
    assert_eq!(spec.data.unwrap().train.unwrap(), std::path::PathBuf::from("/jobs/data/train.json"));
}

const SFT_DP: &str = r#"
version = 1
kind = "sft"

[model]
path = "models/tiny"

[peft]
method = "lora"

[data]
task = "eprstmt"
train = "data/train.json"

[train]
batch_size = 4

[placement]
data_parallel = 2
collective = "coordinator"
"#;

#[test]
fn data_parallel_parses_and_names_bad_fields() {
    let spec = JobSpec::from_toml(SFT_DP).unwrap();
    assert_eq!((spec.placement.data_parallel, spec.placement.collective), (2, CollectiveSpec::Coordinator));
    assert_eq!(JobSpec::from_toml(PPO).unwrap().placement.data_parallel, 1);
    let cases = [
        ("data_parallel = 2", "data_parallel = 0", "placement.data_parallel: must be at least 1"),
        ("data_parallel = 2", "data_parallel = 5", "train.batch_size: must be at least placement.data_parallel (5)"),
        (
            "kind = \"sft\"",
            "kind = \"eval\"",
            "placement.data_parallel: data parallel runs sft, reward, dpo, pretrain, ppo, grpo, rloo and pipeline jobs, not eval",
        ),
        ("\"coordinator\"", "\"mpi\"", "unknown variant `mpi`"),
    ];
    for (from, to, want) in cases {
        let e = JobSpec::from_toml(&SFT_DP.replace(from, to)).unwrap_err().to_string();
        assert!(e.contains(want), "{to}: {e}");
    }
}

#[test]
fn data_sources_resolve_validate_and_exclude_the_single_form() {
    let multi = PPO.replace(
        "task = \"eprstmt\"\ntrain = \"data/train.json\"",
        "sources = [{ task = \"eprstmt\", train = \"e/train.json\", eval = \"e/dev.json\" }, { task = \"bustm\", train = \"b/train.json\" }]",
    );
    let mut spec = JobSpec::from_toml(&multi).unwrap();
    spec.resolve_paths(std::path::Path::new("/jobs"));
    let sources = spec.data.as_ref().unwrap().sources();
    assert_eq!(sources.len(), 2);
    assert_eq!(sources[0].eval.as_deref(), Some(std::path::Path::new("/jobs/e/dev.json")));
    assert_eq!(sources[1].train, std::path::PathBuf::from("/jobs/b/train.json"));
    assert_eq!(JobSpec::from_toml(&spec.to_toml()).unwrap(), spec);
    // The single form is one source.
    let one = JobSpec::from_toml(PPO).unwrap().data.unwrap().sources();
    assert_eq!((one.len(), one[0].task.as_deref()), (1, Some("eprstmt")));
    let cases = [
        (multi.replace("\"bustm\"", "\"mnli\""), "data.sources[1].task: unknown task \"mnli\""),
        (multi.replace("[data]", "[data]\nformat = \"prompt_only\""), "data.format: applies to files in TRL's formats"),
        (multi.replace("[data]", "[data]\nformat = \"chat\""), "data.format: unknown format \"chat\""),
        (multi.replace("[data]", "[data]\ntask = \"tnews\""), "data.task: give either data.sources"),
        (
            multi.replace("[data]", "[data]\ntemplate = \"{sentence}\""),
            "data.template: a template or verbalizer override applies to one task",
        ),
    ];
    for (text, want) in cases {
        let e = JobSpec::from_toml(&text).unwrap_err().to_string();
        assert!(e.starts_with(want), "got {e:?}, want {want:?}");
    }
}

#[test]
fn a_reward_stage_starts_from_an_earlier_reward_stage_only() {
    let text = r#"
version = 1
kind = "pipeline"
[model]
path = "m"
[peft]
method = "lora"
[[stage]]
name = "sft"
kind = "sft"
data = { task = "eprstmt", train = "t.json" }
[[stage]]
name = "rm-prefs"
kind = "reward"
data = { train = "prefs.jsonl" }
[[stage]]
name = "rm-mc"
kind = "reward"
init_from = "rm-prefs"
data = { from_multiple_choice = true, sources = [{ task = "eprstmt", train = "t.json" }] }
"#;
    let spec = JobSpec::from_toml(text).unwrap();
    assert_eq!(spec.stages[2].init_from.as_deref(), Some("rm-prefs"));
    let field = |t: String| JobSpec::from_toml(&t).unwrap_err().to_string();
    assert!(field(text.replace("init_from = \"rm-prefs\"", "init_from = \"sft\""))
        .starts_with("stage[2].init_from: stage \"sft\" is a sft stage"));
    assert!(field(text.replace("init_from = \"rm-prefs\"", "init_from = \"rm-later\""))
        .starts_with("stage[2].init_from: no earlier stage named \"rm-later\""));
    // A multiple-choice reward source needs its task.
    assert!(field(text.replace("{ task = \"eprstmt\", train = \"t.json\" }]", "{ train = \"t.json\" }]"))
        .starts_with("stage[2].data.sources[0].task: required"));
    // Outside a pipeline, train.init_from names a directory, for reward jobs only.
    let mut single =
        JobSpec::from_toml(&PPO.replace("[ppo]", "[train]\ninit_from = \"rm\"\n[ppo]")).unwrap_err().to_string();
    assert!(single.starts_with("train.init_from: only a reward job"), "{single}");
    single = JobSpec::from_toml(
        &PPO.replace("kind = \"ppo\"", "kind = \"reward\"").replace("[ppo]", "[train]\ninit_from = \"rm\"\n[ppo]"),
    )
    .map(|_| String::new())
    .unwrap_or_else(|e| e.to_string());
    assert!(single.is_empty(), "{single}");
}

#[test]
fn job_files_are_validated_and_resolved_locally() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("jobs");
    std::fs::create_dir_all(&sub).unwrap();
    let good = sub.join("sft.toml");
    std::fs::write(
        &good,
        "version = 1\nkind = \"sft\"\n[model]\npath = \"../model\"\n[peft]\nmethod = \"lora\"\n[data]\ntask = \"eprstmt\"\ntrain = \"train.json\"\n",
    )
    .unwrap();
    let spec = JobSpec::load(&good).unwrap();
    let base = sub.canonicalize().unwrap();
    assert_eq!(spec.model.path.as_deref(), Some(base.parent().unwrap().join("model").as_path()));
    assert_eq!(spec.data.as_ref().and_then(|d| d.train.clone()), Some(base.join("train.json")));
    assert!(JobSpec::from_toml(&spec.to_toml()).is_ok(), "the resolved spec round-trips");

    let bad = sub.join("bad.toml");
    std::fs::write(&bad, "version = 1\nkind = \"sft\"\nbogus = 3\n[model]\npath = \"m\"\n").unwrap();
    let e = JobSpec::load(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.toml") && e.contains("bogus"), "{e}");
    assert!(JobSpec::load(&sub.join("missing.toml")).unwrap_err().to_string().contains("cannot read"));
}

#[test]
fn rollout_placement_parses_and_names_bad_fields() {
    let with = |placement: &str| format!("{PPO}\n[placement]\n{placement}\n");
    let spec = JobSpec::from_toml(&with("trainer = \"a\"\nrollout = [\"b\", \"*\", \"\"]")).unwrap();
    assert_eq!(spec.placement.rollout, ["b", "*", ""]);
    assert!(is_any_worker("*") && is_any_worker("") && !is_any_worker("b"));
    let ahead = JobSpec::from_toml(&PPO.replace("iterations = 5", "iterations = 5\nrollout_ahead = 1")).unwrap();
    assert_eq!(ahead.ppo.unwrap().rollout_ahead, 1);
    let twice = JobSpec::from_toml(&PPO.replace("iterations = 5", "iterations = 5\nsamples_per_prompt = 2")).unwrap();
    assert_eq!(twice.ppo.as_ref().unwrap().samples_per_prompt, 2);
    assert!(twice.to_toml().contains("samples_per_prompt = 2"));
    let centred = JobSpec::from_toml(
        &PPO.replace("iterations = 5", "iterations = 5\nsamples_per_prompt = 2\ngroup_baseline = true"),
    )
    .unwrap();
    assert!(centred.ppo.as_ref().unwrap().group_baseline && centred.to_toml().contains("group_baseline = true"));
    assert!(!twice.to_toml().contains("group_baseline"));
    assert_eq!(JobSpec::from_toml(PPO).unwrap().ppo.unwrap().samples_per_prompt, 1);
    // The forward micro-batch: minibatch unless set.
    assert_eq!(JobSpec::from_toml(PPO).unwrap().ppo.unwrap().forward_rows(), 4);
    let fw = JobSpec::from_toml(&PPO.replace("iterations = 5", "iterations = 5\nforward_batch = 2")).unwrap();
    assert_eq!(fw.ppo.as_ref().unwrap().forward_rows(), 2);
    assert!(fw.to_toml().contains("forward_batch = 2") && !twice.to_toml().contains("forward_batch"));
    // The generation batch: every row at once unless set.
    assert_eq!(JobSpec::from_toml(PPO).unwrap().ppo.unwrap().generate_rows(8), 8);
    let gb = JobSpec::from_toml(&PPO.replace("iterations = 5", "iterations = 5\ngenerate_batch = 2")).unwrap();
    assert_eq!(gb.ppo.as_ref().unwrap().generate_rows(8), 2);
    assert!(gb.to_toml().contains("generate_batch = 2") && !twice.to_toml().contains("generate_batch"));
    let cases = [
        (with("trainer = \"a\"\nrollout = [\"a\"]"), "placement.rollout: worker \"a\" is also placement.trainer"),
        (with("rollout = [\"b\", \"b\"]"), "placement.rollout: worker \"b\" is listed twice"),
        (with("rollout = [\"b\"]\ndata_parallel = 2"), "placement.rollout: a data-parallel ppo job generates"),
        (PPO.replace("iterations = 5", "iterations = 5\nrollout_ahead = 2"), "ppo.rollout_ahead: must be 0 or 1"),
        (
            PPO.replace("iterations = 5", "iterations = 5\nsamples_per_prompt = 8"),
            "ppo.samples_per_prompt: must be at least 1 and divide ppo.rollout_batch (8) and ppo.minibatch (4), got 8",
        ),
        (
            PPO.replace("iterations = 5", "iterations = 5\nsamples_per_prompt = 0"),
            "ppo.samples_per_prompt: must be at least 1",
        ),
        (
            PPO.replace("iterations = 5", "iterations = 5\ngroup_baseline = true"),
            "ppo.group_baseline: needs ppo.samples_per_prompt of 2",
        ),
        (
            PPO.replace("iterations = 5", "iterations = 5\nsamples_per_prompt = 2\nforward_batch = 3"),
            "ppo.forward_batch: must be at least 1 and a multiple of ppo.samples_per_prompt (2), got 3",
        ),
        (PPO.replace("iterations = 5", "iterations = 5\nforward_batch = 0"), "ppo.forward_batch: must be at least 1"),
        (
            PPO.replace("iterations = 5", "iterations = 5\nsamples_per_prompt = 2\ngenerate_batch = 3"),
            "ppo.generate_batch: must be at least 1 and a multiple of ppo.samples_per_prompt (2), got 3",
        ),
    ];
    for (text, want) in cases {
        let e = JobSpec::from_toml(&text).unwrap_err().to_string();
        assert!(e.starts_with(want), "got {e:?}, want {want:?}");
    }
}

#[test]
fn the_shipped_job_files_are_valid() {
    let root = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"),
    )
    .join("..");
    let mut n = 0;
    for dir in ["examples", "deploy/placement"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "toml") {
                let spec = JobSpec::load(&e.path()).unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
                // What the coordinator checks of a submitted job.
                spec.check_paths(&[]).unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
                n += 1;
            }
        }
    }
    assert!(n >= 8, "{n} job files");
}

#[test]
fn names_that_would_leave_the_job_dir_are_refused() {
    for bad in ["../../other-job", "a/b", "..", "", "x y", &"n".repeat(65)] {
        let text = PPO.replace("seed = 3", &format!("seed = 3\nname = {bad:?}"));
        let e = JobSpec::from_toml(&text).unwrap_err();
        assert_eq!(e.field, "name", "{bad:?}: {e}");
    }
    assert!(JobSpec::from_toml(&PPO.replace("seed = 3", "seed = 3\nname = \"ppo-v1.2_final\"")).is_ok());
    let pipeline =
        "version = 1\nkind = \"pipeline\"\n[model]\npath = \"/m\"\n[[stage]]\nname = \"../x\"\nkind = \"eval\"\n\
                    eval = { tasks = [{ task = \"eprstmt\", path = \"/d.json\" }] }\n";
    assert_eq!(JobSpec::from_toml(pipeline).unwrap_err().field, "stage[0].name");
}

#[test]
fn network_jobs_need_absolute_paths_under_the_allowed_roots() {
    let spec = JobSpec::from_toml(PPO).unwrap();
    let e = spec.check_paths(&[]).unwrap_err();
    assert_eq!(e.field, "model.path");
    assert!(e.msg.contains("relative"), "{e}");
    let mut abs = spec.clone();
    abs.resolve_paths(std::path::Path::new("/data/jobs"));
    abs.check_paths(&[]).unwrap();
    abs.check_paths(&[PathBuf::from("/data")]).unwrap();
    let e = abs.check_paths(&[PathBuf::from("/models")]).unwrap_err();
    assert!(e.field == "model.path" && e.msg.contains("outside the readable roots (/models)"), "{e}");
    let dotted = JobSpec::from_toml(&PPO.replace("models/tiny", "/data/../etc")).unwrap();
    let mut dotted = dotted;
    dotted.resolve_paths(std::path::Path::new("/data"));
    assert!(dotted.check_paths(&[]).unwrap_err().msg.contains("`..`"));
}

#[test]
fn resolved_paths_have_no_dot_dot() {
    let mut spec = JobSpec::from_toml(&PPO.replace("models/tiny", "../shared/models/tiny")).unwrap();
    spec.resolve_paths(std::path::Path::new("/work/main/examples"));
    assert_eq!(spec.model.path.as_deref(), Some(std::path::Path::new("/work/main/shared/models/tiny")));
    spec.check_paths(&[]).unwrap();
}

#[test]
fn a_reward_head_lr_parses_and_a_bad_one_is_named() {
    let text = "version = 1\nkind = \"reward\"\n[model]\npath = \"/m\"\n[peft]\nmethod = \"lora\"\n[data]\ntask = \"eprstmt\"\nfrom_multiple_choice = true\ntrain = \"/t.json\"\n[train]\nlr = 2e-4\nhead_lr = 5e-3\n";
    assert_eq!(JobSpec::from_toml(text).unwrap().train.unwrap().head_lr, Some(5e-3));
    let e = JobSpec::from_toml(&text.replace("5e-3", "-1.0")).unwrap_err().to_string();
    assert!(e.starts_with("train.head_lr: must be positive"), "{e}");
    let e = JobSpec::from_toml(&text.replace("model]", "model]\ndtype = \"f8\"")).unwrap_err().to_string();
    assert!(e.starts_with("model.dtype: must be f32, bf16, f16 or auto"), "{e}");
}

#[test]
fn bare_pairs_need_multiple_choice_pairs() {
    let text = "version = 1\nkind = \"reward\"\n[model]\npath = \"/m\"\n[peft]\nmethod = \"lora\"\n[data]\ntask = \"eprstmt\"\nfrom_multiple_choice = true\nbare_pairs = true\ntrain = \"/t.json\"\n";
    let spec = JobSpec::from_toml(text).unwrap();
    assert!(spec.data.as_ref().unwrap().bare_pairs);
    assert!(spec.to_toml().contains("bare_pairs = true"));
    let e = JobSpec::from_toml(&text.replace("from_multiple_choice = true\n", "")).unwrap_err().to_string();
    assert!(e.starts_with("data.bare_pairs: applies to reward and dpo jobs with data.from_multiple_choice"), "{e}");
}

#[test]
fn several_rewards_parse_round_trip_and_name_their_fields() {
    let many = r#"reward = { kind = "label" }"#;
    let rewards = r#"[[ppo.rewards]]
kind = "exact"
weight = 2.0
[[ppo.rewards]]
kind = "regex"
pattern = "^\\d+$"
score = 0.5
[[ppo.rewards]]
kind = "length"
target = 64
[[ppo.rewards]]
kind = "http"
url = "http://127.0.0.1:9/score"
"#;
    let text = format!("{}\n{rewards}", PPO.replace(many, ""));
    let spec = JobSpec::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let ppo = spec.ppo.clone().unwrap();
    let fns = ppo.reward_fns();
    assert_eq!(fns.len(), 4);
    assert_eq!((fns[0].source.name(), fns[0].weight), ("exact", 2.0));
    assert_eq!(
        fns[3].source,
        RewardSource::Http {
            url: "http://127.0.0.1:9/score".into(),
            token_file: None,
            timeout_ms: 10_000,
            retries: 2,
            batch: 64
        }
    );
    assert_eq!(JobSpec::from_toml(&spec.to_toml()).unwrap().ppo.unwrap().reward_fns(), fns);
    let cases = [
        ("pattern = \"^\\\\d+$\"", "pattern = \"(\"", "ppo.rewards[1].pattern: not a valid regex"),
        ("url = \"http://127.0.0.1:9/score\"", "url = \"ftp://x\"", "ppo.rewards[3].url: expected http://"),
        (
            "url = \"http://127.0.0.1:9/score\"",
            "url = \"http://localhost/\"\nretries = 9",
            "ppo.rewards[3].retries: must be at most 5",
        ),
        // Beyond loopback: TLS and a bearer token, as the coordinator.
        (
            "url = \"http://127.0.0.1:9/score\"",
            "url = \"http://scorer.example/s\"",
            "ppo.rewards[3].url: \"http://scorer.example/s\" is not on this machine",
        ),
        ("url = \"http://127.0.0.1:9/score\"", "url = \"https://scorer.example/s\"", "a token_file"),
        ("weight = 2.0", "weight = nan", "weight: expected a finite number"),
    ];
    for (from, to, want) in cases {
        let e = JobSpec::from_toml(&text.replace(from, to)).unwrap_err().to_string();
        assert!(e.contains(want), "{to:?}: got {e:?}, want {want:?}");
    }
    let remote = text
        .replace("url = \"http://127.0.0.1:9/score\"", "url = \"https://[2001:db8::1]:8443/s\"\ntoken_file = \"t\"");
    JobSpec::from_toml(&remote).unwrap_or_else(|e| panic!("https with a token: {e}"));
    let both = format!("{PPO}\n{rewards}");
    let e = JobSpec::from_toml(&both).unwrap_err().to_string();
    assert!(e.starts_with("ppo.rewards: give ppo.reward or [[ppo.rewards]], not both"), "{e}");
    let e = JobSpec::from_toml(&PPO.replace(many, "")).unwrap_err().to_string();
    assert!(e.starts_with("ppo.reward: required"), "{e}");
}

#[test]
fn a_pipeline_stage_with_several_rewards_writes_back_as_toml() {
    let text = r#"version = 1
kind = "pipeline"
name = "own-task"
[model]
path = "m"
[peft]
method = "lora"
[[stage]]
name = "ppo"
kind = "ppo"
data = { train = "d.jsonl" }
ppo = { iterations = 3, rewards = [{ kind = "model" }, { kind = "exact", weight = 0.5 }] }
"#;
    let spec = JobSpec::from_toml(text).unwrap();
    let back = toml::to_string_pretty(&spec);
    let back = back.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(JobSpec::from_toml(&back).unwrap(), spec, "{back}");
}
