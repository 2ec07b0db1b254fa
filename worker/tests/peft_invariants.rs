//! Invariants every adapter method must keep: zero-init equals the base,
//! merged equals unmerged, unmerge restores the base, save → load is exact,
//! disabled equals the base, gradients reach only adapter weights, and
//! several named adapters share one base.

mod common;

use common::*;
use rlhf_model::peft::{self, base_parameters, Adapter, Method, PeftConfig, PeftModel};
use tch::{Kind, Tensor};

const METHODS: [Method; 4] = [Method::Lora, Method::Ssf, Method::RepAdapter, Method::Full];

fn config(method: Method) -> PeftConfig {
    let mut c = PeftConfig::new(method);
    c.r = 4;
    c.alpha = 8.0;
    c.seed = 3;
    if method == Method::Lora {
        c.target_modules = vec!["all-linear".into()];
    }
    c
}

fn tokens(name: &str) -> Tensor {
    expected(name, "tokens").unsqueeze(0)
}

fn logits(pm: &PeftModel, name: &str) -> Tensor {
    tch::no_grad(|| pm.logits(&tokens(name))).unwrap()
}

/// Moves every adapter tensor away from its (identity) init.
fn perturb(a: &dyn Adapter, seed: u64) {
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    tch::no_grad(|| {
        for mut t in a.parameters() {
            let noise = peft::normal(&t.size(), 0.05, &mut rng, t.device());
            let _ = t.f_add_(&noise).unwrap();
        }
    });
}

fn with_adapter(name: &str, method: Method, perturbed: bool) -> PeftModel {
    let mut pm = PeftModel::new(load(name));
    let a = peft::build(config(method), &pm.base).unwrap();
    if perturbed {
        perturb(a.as_ref(), 11);
    }
    pm.add("a", a).unwrap();
    pm.set_active(Some("a")).unwrap();
    pm
}

#[test]
fn zero_init_adapter_equals_base() {
    for name in MODELS {
        let base = logits(&PeftModel::new(load(name)), name);
        for m in METHODS {
            let d = max_abs_diff(&logits(&with_adapter(name, m, false), name), &base);
            assert!(d <= 1e-6, "{name} {m:?}: fresh adapter changes logits by {d}");
        }
    }
}

#[test]
fn merged_equals_unmerged_and_unmerge_restores_base() {
    for name in MODELS {
        let base_model = PeftModel::new(load(name));
        let base = logits(&base_model, name);
        let q_before = base_model.base.layers[0].self_attn.q_proj.weight.copy();
        for m in METHODS {
            let mut pm = with_adapter(name, m, true);
            let unmerged = logits(&pm, name);
            assert!(max_abs_diff(&unmerged, &base) > 1e-3, "{name} {m:?}: perturbed adapter must matter");
            pm.merge("a").unwrap();
            let merged = logits(&pm, name);
            let d = max_abs_diff(&merged, &unmerged);
            assert!(d < 1e-5, "{name} {m:?}: merged differs from unmerged by {d}");
            pm.merge("a").unwrap(); // idempotent
            assert!(max_abs_diff(&logits(&pm, name), &merged) == 0.0);
            pm.unmerge("a").unwrap();
            pm.set_active(None).unwrap();
            let d = max_abs_diff(&logits(&pm, name), &base);
            assert!(d < 1e-5, "{name} {m:?}: unmerge leaves logits {d} off the base");
            let dw = max_abs_diff(&pm.base.layers[0].self_attn.q_proj.weight, &q_before);
            assert!(dw < 1e-5, "{name} {m:?}: unmerge leaves q_proj {dw} off");
            if name == "tiny-llama" {
                assert!(
                    pm.base.layers[0].self_attn.q_proj.bias.is_none(),
                    "{m:?}: merge-created bias must go on unmerge"
                );
            }
        }
    }
}

#[test]
fn disabled_adapter_equals_base() {
    for name in MODELS {
        let base = logits(&PeftModel::new(load(name)), name);
        for m in METHODS {
            let mut pm = with_adapter(name, m, true);
            pm.set_active(None).unwrap();
            assert_eq!(max_abs_diff(&logits(&pm, name), &base), 0.0, "{name} {m:?}");
        }
    }
}

#[test]
fn save_load_round_trip_is_exact() {
    for name in MODELS {
        for m in METHODS {
            let pm = with_adapter(name, m, true);
            let dir = tempfile::tempdir().unwrap();
            peft::io::save(pm.adapter("a").unwrap(), dir.path(), name).unwrap();
            let mut fresh = PeftModel::new(load(name));
            let loaded = peft::io::load(dir.path(), &fresh.base).unwrap();
            assert_eq!(loaded.config().method, m);
            fresh.add("b", loaded).unwrap();
            fresh.set_active(Some("b")).unwrap();
            assert_eq!(max_abs_diff(&logits(&fresh, name), &logits(&pm, name)), 0.0, "{name} {m:?}");
        }
    }
}

#[test]
fn gradients_reach_only_adapter_weights() {
    for name in MODELS {
        for m in METHODS {
            let pm = with_adapter(name, m, true);
            let loss = pm.logits(&tokens(name)).unwrap().log_softmax(-1, Kind::Float).mean(Kind::Float);
            loss.backward();
            for t in pm.adapter("a").unwrap().parameters() {
                let g = t.grad();
                assert!(
                    g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                    "{name} {m:?}: adapter tensor got no gradient"
                );
            }
            let layer = &pm.base.layers[0];
            for w in [
                &layer.self_attn.q_proj.weight,
                &layer.mlp.down_proj.weight,
                &pm.base.embed_tokens,
                &pm.base.norm.weight,
            ] {
                assert!(!w.requires_grad() && !w.grad().defined(), "{name} {m:?}: base weight got a gradient");
            }
        }
    }
}

#[test]
fn named_adapters_share_one_base() {
    let name = "tiny-qwen2";
    let mut pm = PeftModel::new(load(name));
    let base = logits(&pm, name);
    let solo: Vec<Tensor> = [Method::Lora, Method::Ssf, Method::RepAdapter]
        .iter()
        .map(|&m| logits(&with_adapter(name, m, true), name))
        .collect();
    for (role, m) in [("policy", Method::Lora), ("reward", Method::Ssf), ("critic", Method::RepAdapter)] {
        let a = peft::build(config(m), &pm.base).unwrap();
        perturb(a.as_ref(), 11);
        pm.add(role, a).unwrap();
    }
    assert!(
        pm.add("policy", peft::build(config(Method::Lora), &pm.base).unwrap()).is_err(),
        "duplicate names are refused"
    );
    for (i, role) in ["policy", "reward", "critic"].into_iter().enumerate() {
        pm.set_active(Some(role)).unwrap();
        assert_eq!(max_abs_diff(&logits(&pm, name), &solo[i]), 0.0, "{role}");
    }
    pm.set_active(None).unwrap();
    assert_eq!(max_abs_diff(&logits(&pm, name), &base), 0.0);
    assert!(pm.set_active(Some("nobody")).is_err());
}

#[test]
fn trainable_parameter_counts() {
    let m = load("tiny-qwen2");
    let (h, inter, layers) = (64i64, 128i64, 2i64);
    let kv = 32i64; // 2 kv heads x 16
    let count = |c: PeftConfig| peft::build(c, &m).unwrap().num_parameters();
    // LoRA on q_proj, v_proj (the default): r*(in+out) each.
    let lora = PeftConfig { r: 4, ..PeftConfig::new(Method::Lora) };
    assert_eq!(count(lora), layers * 4 * ((h + h) + (h + kv)));
    // SSF everywhere: 2 per output feature of 7 projections + 2 norms per layer, + final norm.
    let per_layer = 2 * (h + kv + kv + h + inter + inter + h) + 2 * 2 * h;
    assert_eq!(count(PeftConfig::new(Method::Ssf)), layers * per_layer + 2 * h);
    // RepAdapter r=8, 2 groups, both blocks: down r*h + up h*(r/k) + bias h.
    assert_eq!(count(PeftConfig::new(Method::RepAdapter)), layers * 2 * (8 * h + h * 4 + h));
    // Full = every base parameter.
    assert_eq!(count(PeftConfig::new(Method::Full)), base_parameters(&m));
}
