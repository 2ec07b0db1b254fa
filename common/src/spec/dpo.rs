//! `[dpo]`: direct preference optimisation of the policy adapter on
//! preference pairs against the frozen base (the adapter off) as the
//! reference, with TRL's loss types. Errors name the field (`dpo.beta`).

use serde::{Deserialize, Serialize};

use super::{err, SpecError};

/// The DPO losses, as TRL 1.12 names them.
pub const DPO_LOSSES: [&str; 3] = ["sigmoid", "ipo", "hinge"];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSpec {
    /// β: the strength of the implicit KL to the reference (IPO's τ).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// `sigmoid` (DPO), `ipo` (on per-token average log-ratios, as TRL) or
    /// `hinge` (SLiC).
    #[serde(default = "default_loss")]
    pub loss_type: String,
    /// `sigmoid` only: the share of pairs taken as flipped (conservative
    /// DPO): `−(1−ε) log σ(βΔ) − ε log σ(−βΔ)`.
    #[serde(default)]
    pub label_smoothing: f64,
}

fn default_beta() -> f64 {
    0.1
}
fn default_loss() -> String {
    "sigmoid".into()
}

impl Default for DpoSpec {
    fn default() -> Self {
        Self { beta: default_beta(), loss_type: default_loss(), label_smoothing: 0.0 }
    }
}

impl DpoSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return err("dpo.beta", format!("must be positive, got {}", self.beta));
        }
        if !DPO_LOSSES.contains(&self.loss_type.as_str()) {
            return err("dpo.loss_type", format!("must be one of {}, got {:?}", DPO_LOSSES.join(", "), self.loss_type));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return err("dpo.label_smoothing", format!("must be in [0, 0.5), got {}", self.label_smoothing));
        }
        if self.label_smoothing > 0.0 && self.loss_type != "sigmoid" {
            return err(
                "dpo.label_smoothing",
                format!("applies to loss_type = \"sigmoid\" only, not {:?}", self.loss_type),
            );
        }
        Ok(())
    }
}
