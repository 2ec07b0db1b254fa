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
    assert_eq!((ppo.clip, ppo.value_clip, ppo.vf_coef, ppo.gamma, ppo.lam, ppo.kl_coef), (0.2, 0.2, 0.1, 1.0, 0.95, 0.05));
    assert_eq!(ppo.reward, RewardSource::Label);
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
        ("kind = \"sft\"", "kind = \"eval\"", "placement.data_parallel: data parallel runs sft, reward, pretrain, ppo and pipeline jobs, not eval"),
        ("\"coordinator\"", "\"mpi\"", "unknown variant `mpi`"),
    ];
    for (from, to, want) in cases {
        let e = JobSpec::from_toml(&SFT_DP.replace(from, to)).unwrap_err().to_string();
        assert!(e.contains(want), "{to}: {e}");
    }
}
