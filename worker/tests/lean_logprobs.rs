//! The chunked LM-head log-probs (`train::logprobs`) against the plain
//! computation over whole `[rows, vocab]` logits: the same log-probs,
//! entropies and losses to 1e-5, and the same gradients for every PEFT
//! method (`full` trains the head too, which takes the two-pass path).

mod common;

use common::{load, MODELS};
use rlhf_model::peft::{self, Method, PeftConfig, PeftModel};
use rlhf_model::Mask;
use rlhf_worker::train::logprobs::{backprop_through_head_in, token_logprobs_in};
use rlhf_worker::train::ppo::entropy_per_token;
use rlhf_worker::train::ppo::rollout::Batch;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

fn adapter_model(name: &str, method: Method) -> PeftModel {
    let mut pm = PeftModel::new(load(name));
    let mut cfg = PeftConfig::new(method);
    cfg.seed = 7;
    let a = peft::build(cfg, &pm.base).unwrap();
    // Move every adapter tensor off its init so no gradient is trivially zero.
    tch::no_grad(|| {
        for (i, p) in a.parameters().iter().enumerate() {
            let mut p = p.shallow_clone();
            let noise = Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * 0.02 * ((i % 3) as f64 + 1.0);
            let _ = p.f_add_(&noise.to_kind(p.kind())).unwrap();
        }
    });
    pm.add("a", a).unwrap();
    pm.set_active(Some("a")).unwrap();
    pm
}

fn batch() -> Batch {
    Batch::new(
        &[vec![5, 9, 14, 3], vec![7, 11], vec![40, 41, 42]],
        &[vec![20, 21, 22, 23], vec![30], vec![50, 51]],
        0,
        Device::Cpu,
    )
}

fn zero_grads(ps: &[Tensor]) {
    for p in ps {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// The loss both ways take: a weighted sum of log-probs and entropies.
fn loss(logp: &Tensor, ent: &Tensor, mask: &Tensor) -> Tensor {
    let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 1.5, 0.3, 0.0, 0.0, 0.0, -0.7, 1.1, 0.0, 0.0]).view([3, 4]);
    (logp * &w * mask).sum(Kind::Float) + (ent * mask).sum(Kind::Float) * 0.01
}

/// Plain: whole logits at 0.8 temperature, `log_softmax`, gathered.
fn plain(pm: &PeftModel, b: &Batch) -> (Tensor, Tensor, f64) {
    let hidden = b.response_hidden(pm).unwrap();
    let logits = pm.base.logits(&hidden, pm.hooks()).to_kind(Kind::Float) / 0.8;
    let logp = logits.log_softmax(-1, Kind::Float).gather(2, &b.response.unsqueeze(-1), false).squeeze_dim(-1);
    let ent = entropy_per_token(&logits);
    let l = loss(&logp, &ent.detach(), &b.mask);
    let v = l.double_value(&[]);
    l.backward();
    (logp.detach(), ent.detach(), v)
}

/// Lean, `rows` rows per chunk.
fn lean(pm: &PeftModel, b: &Batch, rows: i64) -> (Tensor, Tensor, f64) {
    let hidden = b.response_hidden(pm).unwrap();
    let (surrogate, (logp, ent, v)) =
        backprop_through_head_in(pm, &hidden, &b.response, 0.8, true, rows, |logp, ent| {
            let ent = ent.expect("entropy asked for");
            let l = loss(logp, ent, &b.mask);
            let v = l.double_value(&[]);
            Ok((l, (logp.detach(), ent.shallow_clone(), v)))
        })
        .unwrap();
    surrogate.backward();
    (logp, ent, v)
}

#[test]
fn chunked_logprobs_entropies_and_gradients_equal_the_whole_logits() {
    for name in MODELS {
        for method in [Method::Lora, Method::Ssf, Method::RepAdapter, Method::Full] {
            let pm = adapter_model(name, method);
            let params = pm.adapter("a").unwrap().parameters();
            let b = batch();
            zero_grads(&params);
            let (lp0, e0, v0) = plain(&pm, &b);
            let g0: Vec<Tensor> = params.iter().map(|p| p.grad().copy()).collect();
            for rows in [1, 5, 1000] {
                zero_grads(&params);
                let (lp, e, v) = lean(&pm, &b, rows);
                let what = format!("{name} {method:?} rows {rows}");
                let d = (&lp0 - &lp).abs().max().double_value(&[]);
                assert!(d < TOL, "{what}: log-probs differ by {d:e}");
                let d = (&e0 - &e).abs().max().double_value(&[]);
                assert!(d < TOL, "{what}: entropies differ by {d:e}");
                assert!((v0 - v).abs() < TOL * (1.0 + v0.abs()), "{what}: loss {v} vs {v0}");
                let no_grad = tch::no_grad(|| {
                    token_logprobs_in(&pm, &b.response_hidden(&pm).unwrap(), &b.response, 0.8, false, rows).0
                });
                let d = (&lp0 - &no_grad).abs().max().double_value(&[]);
                assert!(d < TOL, "{what}: graph-free log-probs differ by {d:e}");
                let mut worst = 0f64;
                for (a, p) in g0.iter().zip(&params) {
                    let g = p.grad();
                    worst = worst.max((a - &g).abs().max().double_value(&[]) / (1.0 + a.abs().max().double_value(&[])));
                }
                assert!(worst < TOL, "{what}: gradients differ by {worst:e}");
                assert!(
                    g0.iter().any(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0),
                    "{what}: all gradients zero"
                );
            }
        }
    }
}

/// The SFT loss through `lm_targets` + the lean head equals torch's
/// cross-entropy over whole logits.
#[test]
fn lm_loss_equals_cross_entropy_over_whole_logits() {
    use rlhf_model::batch::positions;
    use rlhf_worker::train::setup::{lm_loss, lm_targets};
    for name in MODELS {
        let pm = adapter_model(name, Method::Lora);
        let ids = Tensor::from_slice(&[5i64, 9, 14, 3, 8, 7, 11, 40, 41, 0]).view([2, 5]);
        let target_mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 0, 1, 1, 1, 0]).view([2, 5]);
        let hidden = tch::no_grad(|| pm.forward(&ids, &positions(&ids), Mask::Causal, None)).unwrap();
        let (h, t) = lm_targets(&ids, &target_mask, &hidden).unwrap();
        assert_eq!(t.size(), [6]);
        let ce = tch::no_grad(|| pm.base.logits(&h, pm.hooks()).to_kind(Kind::Float).cross_entropy_for_logits(&t))
            .double_value(&[]);
        let (l, n) = lm_loss(&pm, &ids, &target_mask).unwrap();
        assert_eq!(n, 6);
        assert!((ce - l).abs() < TOL, "{name}: {l} vs cross-entropy {ce}");
    }
}
