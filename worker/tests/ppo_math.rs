//! The PPO math (train::ppo::{gae, kl, loss}) equals TRL's formulas as recomputed in plain PyTorch
//! by scripts/ppo_reference.py (fixture: tests/fixtures/ppo_reference.safetensors).

use std::collections::HashMap;
use std::path::PathBuf;

use rlhf_worker::train::ppo::{
    apply_missing_eos_penalty, clip_score, entropy_from_logits, gae, masked_mean, masked_var, masked_whiten,
    penalized_rewards, policy_loss, value_loss, KlController, KlEstimator,
};
use tch::{Kind, Tensor};

/// Max absolute difference allowed for every output, losses included (f32 on both sides; the
/// observed differences are at most one f32 ulp, ~1.2e-7).
const TOL: f64 = 1e-6;

struct Ref(HashMap<String, Tensor>);

impl Ref {
    fn load() -> Self {
        let path =
            PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"))
                .join("tests/fixtures/ppo_reference.safetensors");
        let tensors = Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Ref(tensors.into_iter().collect())
    }

    fn get(&self, name: &str) -> &Tensor {
        self.0.get(name).unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }

    fn input(&self, name: &str) -> &Tensor {
        self.get(&format!("in.{name}"))
    }

    fn param(&self, name: &str) -> f64 {
        self.get(&format!("param.{name}")).double_value(&[0])
    }

    /// Asserts `got` equals `out.<name>` within `tol` (max absolute difference, same shape).
    fn check(&self, name: &str, got: &Tensor, tol: f64) {
        let want = self.get(&format!("out.{name}"));
        assert_eq!(got.size(), want.size(), "{name}: shape");
        let d = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs().max().double_value(&[]);
        assert!(d <= tol, "{name}: differs from the PyTorch reference by {d} (tolerance {tol})");
    }
}

#[test]
fn masked_statistics_match_reference() {
    let r = Ref::load();
    let (x, mask) = (r.input("x"), r.input("mask"));
    r.check("mean", &masked_mean(x, mask), TOL);
    r.check("var.unbiased", &masked_var(x, mask, true), TOL);
    r.check("var.biased", &masked_var(x, mask, false), TOL);
    r.check("whiten.shift", &masked_whiten(x, mask, true), TOL);
    r.check("whiten.noshift", &masked_whiten(x, mask, false), TOL);
}

/// The score as the trainer prepares it: missing-EOS penalty, then clipping.
fn adjusted_score(r: &Ref) -> Tensor {
    let score = apply_missing_eos_penalty(r.input("score"), r.input("has_eos"), r.param("eos_penalty"));
    clip_score(&score, Some(r.param("score_clip")))
}

#[test]
fn score_adjustments_match_reference() {
    let r = Ref::load();
    r.check("score_adj", &adjusted_score(&r), TOL);
}

#[test]
fn penalized_rewards_match_reference_for_k1_and_k3() {
    let r = Ref::load();
    let score = adjusted_score(&r);
    for (est, name) in [(KlEstimator::K1, "k1"), (KlEstimator::K3, "k3")] {
        let (rewards, kl) =
            penalized_rewards(&score, r.input("logp"), r.input("ref_logp"), r.input("mask"), r.param("kl_coef"), est);
        r.check(&format!("rewards.{name}"), &rewards, TOL);
        r.check(&format!("kl.{name}"), &kl, TOL);
    }
}

#[test]
fn gae_matches_reference_for_two_gamma_lambda_pairs() {
    let r = Ref::load();
    let (values, mask) = (r.input("values"), r.input("mask"));
    let rewards = r.get("out.rewards.k1");
    for i in 1..=2 {
        let (gamma, lam) = (r.param(&format!("gamma{i}")), r.param(&format!("lam{i}")));
        let (adv, ret) = gae(rewards, values, mask, gamma, lam);
        r.check(&format!("gae{i}.adv"), &adv, TOL);
        r.check(&format!("gae{i}.ret"), &ret, TOL);
        r.check(&format!("gae{i}.adv_white"), &masked_whiten(&adv, mask, true), TOL);
    }
}

#[test]
fn policy_loss_matches_reference() {
    let r = Ref::load();
    let out = policy_loss(
        r.input("logp_new"),
        r.input("logp"),
        r.get("out.gae1.adv_white"),
        r.input("mask"),
        r.param("clip"),
    );
    r.check("pg.loss", &out.loss, TOL);
    r.check("pg.clip_frac", &out.clip_frac, TOL);
    r.check("pg.approx_kl", &out.approx_kl, TOL);
}

#[test]
fn value_loss_matches_reference() {
    let r = Ref::load();
    let out = value_loss(
        r.input("values_new"),
        r.input("values"),
        r.get("out.gae1.ret"),
        r.input("mask"),
        r.param("clip_value"),
    );
    r.check("vf.loss", &out.loss, TOL);
    r.check("vf.clip_frac", &out.clip_frac, TOL);
}

#[test]
fn entropy_matches_reference() {
    let r = Ref::load();
    r.check("entropy", &entropy_from_logits(r.input("logits"), r.input("mask")), TOL);
}

#[test]
fn adaptive_kl_controller_matches_reference() {
    let r = Ref::load();
    let mut ctl = KlController::Adaptive {
        coef: r.param("kl_init"),
        target: r.param("kl_target"),
        horizon: r.param("kl_horizon"),
    };
    let obs = Vec::<f64>::try_from(r.input("kl_obs")).expect("f64 kl_obs");
    let steps = Vec::<i64>::try_from(r.input("kl_n_steps")).expect("i64 kl_n_steps");
    let want = Vec::<f64>::try_from(r.get("out.kl_ctl.coef")).expect("f64 coefs");
    assert_eq!(obs.len(), want.len());
    for ((kl, n), want) in obs.iter().zip(&steps).zip(&want) {
        ctl.update(*kl, *n as usize);
        assert!((ctl.coef() - want).abs() < 1e-12, "coef {} != reference {want} after kl {kl}", ctl.coef());
    }
}

/// The whole rollout-side chain in one go, as the trainer will run it: adjusted score ->
/// penalised rewards -> GAE -> whitened advantages -> losses, starting only from the inputs.
#[test]
fn full_chain_from_inputs_matches_reference() {
    let r = Ref::load();
    let mask = r.input("mask");
    let (rewards, _) = penalized_rewards(
        &adjusted_score(&r),
        r.input("logp"),
        r.input("ref_logp"),
        mask,
        r.param("kl_coef"),
        KlEstimator::K1,
    );
    let (adv, ret) = gae(&rewards, r.input("values"), mask, r.param("gamma1"), r.param("lam1"));
    let adv = masked_whiten(&adv, mask, true);
    let pg = policy_loss(r.input("logp_new"), r.input("logp"), &adv, mask, r.param("clip"));
    let vf = value_loss(r.input("values_new"), r.input("values"), &ret, mask, r.param("clip_value"));
    r.check("pg.loss", &pg.loss, TOL);
    r.check("vf.loss", &vf.loss, TOL);
}
