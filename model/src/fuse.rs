//! Fused projections: q, k and v of a layer as one `[q + k + v, hidden]`
//! matmul, gate and up as one `[2 · intermediate, hidden]`, so a decode
//! step issues five projection GEMMs per layer instead of seven (fewer
//! launches, the normed input read once per block); larger or
//! differentiated forwards keep the separate ones ([`worth_it`]). The separate
//! weights become views of the fused one's rows, so whatever changes them
//! in place (an adapter merged into the base) changes the fused one too
//! (what does not, a bias a merge adds, sends the layer back to its
//! separate projections: [`current`]); adapters still see each
//! projection's own input and output.

use std::sync::OnceLock;

use tch::Tensor;

use super::layers::Linear;

/// Whether models fuse their projections when they are loaded or built:
/// yes, unless `RLHF_FUSE_PROJECTIONS=0` (read once per process).
pub fn by_default() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("RLHF_FUSE_PROJECTIONS").map_or(true, |v| v != "0"))
}

/// Most tokens a forward may have for the fused matmul: a decode step's
/// rows (up to this many sequences). A prefill or a training batch runs
/// the separate ones, whose outputs are contiguous.
pub const MAX_TOKENS: i64 = 256;

/// Whether input `x` (`[b, t, hidden]`) goes through the fused matmul: when
/// it has few tokens (a decode step: the matmuls are bound by reading the
/// weights, and one launch replaces three) and no gradient flows back
/// through it (the backward of the split would add a full-width zero
/// tensor per part: measured 13% slower on a DPO step). The separate
/// weights are views of the fused one, so either way costs no memory.
pub fn worth_it(x: &Tensor) -> bool {
    !x.requires_grad() && x.numel() as i64 / x.size().last().copied().unwrap_or(1).max(1) <= MAX_TOKENS
}

/// Whether `fused` still holds `parts`: each part's weight (and bias) is
/// its rows of the fused one's. Changes made in place (an adapter merged
/// into the weights) keep this; a bias a merge creates (RepAdapter's, on
/// a model without biases) or a weight replaced does not, and the layer
/// then runs its separate projections.
pub fn current(fused: &Linear, parts: &[&Linear]) -> bool {
    let at =
        |t: &Tensor, row: i64| t.data_ptr() as usize + (row * t.stride()[0]) as usize * t.kind().elt_size_in_bytes();
    let mut row = 0;
    parts.iter().all(|p| {
        let bias = match (&fused.bias, &p.bias) {
            (Some(f), Some(b)) => b.data_ptr() as usize == at(f, row),
            (None, None) => true,
            _ => false,
        };
        let ok = bias && p.weight.data_ptr() as usize == at(&fused.weight, row);
        row += p.out_dim();
        ok
    })
}

/// Whether `parts` can be one projection: all with a bias or none.
pub(crate) fn fusable(parts: &[&mut Linear]) -> bool {
    let biased = parts.iter().filter(|l| l.bias.is_some()).count();
    biased == 0 || biased == parts.len()
}

/// Moves `parts`' weights and biases to the CPU (the first half of fusing
/// a GPU model's projections without holding both copies there).
pub(crate) fn to_host(parts: &mut [&mut Linear]) {
    for l in parts.iter_mut() {
        l.weight = l.weight.to_device(tch::Device::Cpu);
        l.bias = l.bias.as_ref().map(|b| b.to_device(tch::Device::Cpu));
    }
}

/// `parts` as one projection on `device`; each part's weight (and bias)
/// becomes a view of its rows of it. `None` (nothing changed) when some
/// parts have a bias and others not.
pub(crate) fn fuse(parts: &mut [&mut Linear], device: tch::Device) -> Option<Linear> {
    if !fusable(parts) {
        return None;
    }
    let cat = |ts: Vec<&Tensor>| Tensor::cat(&ts, 0).to_device(device);
    let weight = cat(parts.iter().map(|l| &l.weight).collect());
    let bias = parts[0].bias.is_some().then(|| cat(parts.iter().map(|l| l.bias.as_ref().expect("biased")).collect()));
    let mut row = 0;
    for part in parts.iter_mut() {
        let n = part.out_dim();
        part.weight = weight.narrow(0, row, n);
        part.bias = bias.as_ref().map(|b| b.narrow(0, row, n));
        row += n;
    }
    Some(Linear { weight, bias })
}

/// Each of `parts` gets its own weight (and bias) again: a copy of its
/// rows of the fused one.
pub(crate) fn separate(parts: &mut [&mut Linear]) {
    for l in parts.iter_mut() {
        l.weight = l.weight.copy();
        l.bias = l.bias.as_ref().map(Tensor::copy);
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use crate::init::Preset;
    use crate::peft::{self, Method, PeftConfig, PeftModel};
    use crate::random::random_model;
    use crate::{KvCache, Mask};

    /// Fused projections give the separate ones' hidden states (to float
    /// rounding: one GEMM over the concatenated rows), with a LoRA on every
    /// projection, and a merge into the separate weights reaches the fused.
    #[test]
    fn fused_projections_equal_the_separate_ones_under_lora_and_merges() {
        // One model, fused in place after the separate forward (a second
        // random model would draw from torch's generator, which tests share).
        let mut base = random_model(Preset::Tiny.config(300, 1, 2), Kind::Float, Device::Cpu, 3).expect("model");
        base.separate_projections();
        assert!(!base.is_fused());
        let mut pm = PeftModel::new(base);
        let mut cfg = PeftConfig::new(Method::Lora);
        cfg.target_modules = vec!["all-linear".into()];
        let lora = peft::build(cfg, &pm.base).expect("lora");
        tch::no_grad(|| {
            for p in lora.parameters() {
                let n = p.numel() as i64;
                let wave = Tensor::arange(n, (Kind::Float, Device::Cpu)).cos().view(p.size().as_slice());
                let _ = p.shallow_clone().f_add_(&(wave * 0.05)).expect("perturb");
            }
        });
        pm.add("policy", lora).expect("add");
        pm.set_active(Some("policy")).expect("active");
        let ids = Tensor::from_slice(&[5i64, 17, 2, 250, 9, 33, 41, 8]).view([2, 4]);
        let pos = crate::batch::positions(&ids);
        let forward = |pm: &PeftModel| {
            tch::no_grad(|| {
                let mut cache = KvCache::new(pm.base.layers.len());
                pm.base.forward(&ids, &pos, Mask::Causal, Some(&mut cache), pm.hooks()).expect("forward")
            })
        };
        let separate = forward(&pm);
        pm.base.fuse_projections();
        assert!(pm.base.is_fused());
        let fused = forward(&pm);
        let d = (&separate - &fused).abs().max().double_value(&[]);
        assert!(d < 1e-5, "fused differs from separate by {d:e}");
        pm.merge("policy").expect("merge");
        pm.set_active(None).expect("inactive");
        let merged = forward(&pm);
        let d = (&fused - &merged).abs().max().double_value(&[]);
        assert!(d < 1e-5, "merged into the fused weights differs from the hooked LoRA by {d:e}");
    }
}
