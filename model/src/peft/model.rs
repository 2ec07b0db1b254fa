//! One frozen base, several named adapters, at most one active.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use tch::Tensor;

use super::Adapter;
use crate::error::{Error, Result};
use crate::{Hooks, KvCache, Mask, Model, NoHooks};

struct Slot {
    adapter: Box<dyn Adapter>,
    merged: bool,
}

pub struct PeftModel {
    pub base: Model,
    adapters: BTreeMap<String, Slot>,
    active: Option<String>,
    /// Set inside [`PeftModel::without_adapter`].
    off: AtomicBool,
}

impl PeftModel {
    pub fn new(base: Model) -> Self {
        Self { base, adapters: BTreeMap::new(), active: None, off: AtomicBool::new(false) }
    }

    /// Adds a named adapter (inactive).
    pub fn add(&mut self, name: &str, adapter: Box<dyn Adapter>) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Err(Error::AdapterState(format!("an adapter named {name:?} already exists")));
        }
        self.adapters.insert(name.to_string(), Slot { adapter, merged: false });
        Ok(())
    }

    /// Removes an adapter, unmerging it first if needed.
    pub fn remove(&mut self, name: &str) -> Result<Box<dyn Adapter>> {
        if self.is_merged(name)? {
            self.unmerge(name)?;
        }
        if self.active.as_deref() == Some(name) {
            self.active = None;
        }
        let slot = self.adapters.remove(name).ok_or_else(|| Self::unknown(name))?;
        Ok(slot.adapter)
    }

    fn unknown(name: &str) -> Error {
        Error::AdapterState(format!("no adapter named {name:?}"))
    }

    /// Makes `name` the active adapter; `None` disables adapters (the base,
    /// i.e. the reference policy).
    pub fn set_active(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            if !self.adapters.contains_key(n) {
                return Err(Self::unknown(n));
            }
        }
        self.active = name.map(String::from);
        Ok(())
    }

    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.adapters.keys().map(String::as_str)
    }

    pub fn adapter(&self, name: &str) -> Result<&dyn Adapter> {
        self.adapters.get(name).map(|s| s.adapter.as_ref()).ok_or_else(|| Self::unknown(name))
    }

    pub fn is_merged(&self, name: &str) -> Result<bool> {
        self.adapters.get(name).map(|s| s.merged).ok_or_else(|| Self::unknown(name))
    }

    /// Runs `f` with the active adapter off (the base: DPO's and GRPO's
    /// reference policy), without the `&mut` that [`set_active`] takes.
    ///
    /// [`set_active`]: PeftModel::set_active
    pub fn without_adapter<T>(&self, f: impl FnOnce() -> T) -> T {
        let before = self.off.swap(true, Ordering::SeqCst);
        let out = f();
        self.off.store(before, Ordering::SeqCst);
        out
    }

    /// The hooks of the active adapter, or none when it is disabled or
    /// already merged into the base.
    pub fn hooks(&self) -> &dyn Hooks {
        if self.off.load(Ordering::SeqCst) {
            return &NoHooks;
        }
        match self.active.as_ref().and_then(|n| self.adapters.get(n)) {
            Some(slot) if !slot.merged => slot.adapter.as_ref(),
            _ => &NoHooks,
        }
    }

    /// Folds `name` into the base weights. Idempotent.
    pub fn merge(&mut self, name: &str) -> Result<()> {
        let slot = self.adapters.get_mut(name).ok_or_else(|| Self::unknown(name))?;
        if !slot.merged {
            slot.adapter.merge_into(&mut self.base)?;
            slot.merged = true;
        }
        Ok(())
    }

    /// Takes `name` back out of the base weights. Idempotent.
    pub fn unmerge(&mut self, name: &str) -> Result<()> {
        let slot = self.adapters.get_mut(name).ok_or_else(|| Self::unknown(name))?;
        if slot.merged {
            slot.adapter.unmerge_from(&mut self.base)?;
            slot.merged = false;
        }
        Ok(())
    }

    /// Hidden states with the active adapter.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Mask<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.base.forward(ids, positions, mask, cache, self.hooks())
    }

    /// Logits `[b, t, vocab]` of full sequences `[b, t]` (no padding).
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        let t = ids.size()[1];
        let positions = Tensor::arange(t, (tch::Kind::Int64, ids.device())).unsqueeze(0).expand_as(ids);
        let hidden = self.forward(ids, &positions, Mask::Causal, None)?;
        Ok(self.base.logits(&hidden, self.hooks()))
    }
}
