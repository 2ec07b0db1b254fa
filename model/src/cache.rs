//! Per-layer key/value cache for incremental decoding.
//!
//! Two layouts behind one API:
//! - growing ([`KvCache::new`]): each step's keys are concatenated to the
//!   cached ones, a fresh tensor per layer and step. Training forwards that
//!   cache a shared prompt (under autograd) use it.
//! - static ([`KvCache::with_capacity`]): one `[rows, kv_heads, positions,
//!   head_dim]` buffer per layer, allocated once and written in place; a
//!   step's attention reads a view of the filled positions. No per-step copy
//!   of the whole cache (the growing layout copies O(T) per step, O(T²) per
//!   response), stable addresses across steps, and the buffers are reused by
//!   the next generation ([`KvCache::reset`]). Grows (one copy) if a batch
//!   needs more rows or positions than it holds.

use tch::{Device, Kind, Tensor};

/// Keys and values of every layer, `[batch, kv_heads, seq, head_dim]`.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// The static layout's fill: rows in use, positions filled per layer.
    fixed: Option<Fill>,
    /// Fixed-shape steps ([`KvCache::set_slot`]): the position written.
    slot: Option<Tensor>,
}

struct Fill {
    rows: i64,
    lens: Vec<i64>,
}

/// The shape of a static cache: rows × positions for `layers` layers of
/// `kv_heads` heads of `head_dim`, in `kind` on `device`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheShape {
    pub layers: usize,
    pub rows: i64,
    pub positions: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub kind: Kind,
    pub device: Device,
}

impl KvCache {
    /// A growing cache.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect(), fixed: None, slot: None }
    }

    /// A static cache of `shape`'s capacity, zero-filled.
    pub fn with_capacity(shape: CacheShape) -> Self {
        let dims = [shape.rows, shape.kv_heads, shape.positions, shape.head_dim];
        let layers = (0..shape.layers)
            .map(|_| {
                Some((Tensor::zeros(dims, (shape.kind, shape.device)), Tensor::zeros(dims, (shape.kind, shape.device))))
            })
            .collect();
        Self { layers, fixed: Some(Fill { rows: 0, lens: vec![0; shape.layers] }), slot: None }
    }

    /// Whether this is a static cache.
    pub fn is_static(&self) -> bool {
        self.fixed.is_some()
    }

    /// The static cache's capacity (rows, positions); `None` for a growing one.
    pub fn capacity(&self) -> Option<(i64, i64)> {
        self.fixed.as_ref()?;
        match self.layers.first() {
            Some(Some((k, _))) => Some((k.size()[0], k.size()[2])),
            _ => Some((0, 0)),
        }
    }

    /// Empties the cache; a static one keeps its buffers for the next use.
    pub fn reset(&mut self) {
        match &mut self.fixed {
            Some(fill) => {
                fill.rows = 0;
                fill.lens.iter_mut().for_each(|l| *l = 0);
            }
            None => self.layers.iter_mut().for_each(|l| *l = None),
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> i64 {
        match (&self.fixed, self.layers.first()) {
            (Some(fill), _) => fill.lens.first().copied().unwrap_or(0),
            (None, Some(Some((k, _)))) => k.size()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values for `layer`; returns the full ones.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let Some(fill) = &mut self.fixed else {
            let slot = &mut self.layers[layer];
            let (k, v) = match slot.take() {
                Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
                None => (k, v),
            };
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
            return (k, v);
        };
        let (rows, t) = (k.size()[0], k.size()[2]);
        if let Some(slot) = &self.slot {
            let (bk, bv) = self.layers[layer].as_ref().expect("static caches hold every layer");
            let (mut bk, mut bv) = (bk.narrow(0, 0, rows), bv.narrow(0, 0, rows));
            let _ = bk.index_copy_(2, slot, &k);
            let _ = bv.index_copy_(2, slot, &v);
            return (bk, bv);
        }
        let start = fill.lens[layer];
        let kept = if start == 0 { 0 } else { fill.rows.min(rows) };
        fill.rows = rows;
        let (bk, bv) = self.layers[layer].as_mut().expect("static caches hold every layer");
        if rows > bk.size()[0] || start + t > bk.size()[2] {
            // Past the capacity: a larger buffer, the filled part copied once.
            let cap = bk.size()[2];
            let positions = if start + t > cap { (start + t).max(2 * cap) } else { cap };
            *bk = grown(bk, kept, start, rows, positions);
            *bv = grown(bv, kept, start, rows, positions);
        }
        bk.narrow(0, 0, rows).narrow(2, start, t).copy_(&k);
        bv.narrow(0, 0, rows).narrow(2, start, t).copy_(&v);
        fill.lens[layer] = start + t;
        (bk.narrow(0, 0, rows).narrow(2, 0, start + t), bv.narrow(0, 0, rows).narrow(2, 0, start + t))
    }

    /// Makes a static cache hold at least `rows` × `positions`, keeping
    /// what it holds (a growing cache is left as it is).
    pub fn reserve(&mut self, rows: i64, positions: i64) {
        let Some(fill) = &self.fixed else { return };
        for ((k, v), &len) in self.layers.iter_mut().flatten().zip(&fill.lens) {
            if rows > k.size()[0] || positions > k.size()[2] {
                let (rows, positions) = (rows.max(k.size()[0]), positions.max(k.size()[2]));
                *k = grown(k, fill.rows, len, rows, positions);
                *v = grown(v, fill.rows, len, rows, positions);
            }
        }
    }

    /// Fixed-shape steps (what a CUDA graph records): with a slot, a
    /// static cache's `append` writes one position, the one `slot` (a
    /// 1-element int64 tensor on the cache's device) holds, and returns
    /// every position of the rows in use, the filled and the empty ones
    /// (zeros, or an earlier use's values): attention must mask the ones
    /// not yet written. Shapes and addresses stay the same from step to
    /// step; the caller moves the slot on in place. The fill counts are
    /// not updated; `None` ends the mode.
    pub fn set_slot(&mut self, slot: Option<Tensor>) {
        assert!(slot.is_none() || self.is_static(), "fixed-shape steps need a static cache");
        self.slot = slot;
    }

    /// The static buffers' capacity in positions (0 for a growing cache).
    pub fn positions(&self) -> i64 {
        self.capacity().map_or(0, |(_, p)| p)
    }

    /// Keeps only the rows in `index`, in its order (finished sequences
    /// dropped from a batch, or a prompt's cache copied to its samples).
    pub fn select_rows(&mut self, index: &Tensor) {
        let Some(fill) = &mut self.fixed else {
            for (k, v) in self.layers.iter_mut().flatten() {
                *k = k.index_select(0, index);
                *v = v.index_select(0, index);
            }
            return;
        };
        let n = index.size()[0];
        let fixed_steps = self.slot.is_some();
        for ((k, v), &len) in self.layers.iter_mut().flatten().zip(&fill.lens) {
            for buf in [k, v] {
                // Fixed-shape steps do not count what they write: every
                // position goes.
                let len = if fixed_steps { buf.size()[2] } else { len };
                let picked = buf.narrow(0, 0, fill.rows).narrow(2, 0, len).index_select(0, index);
                if n > buf.size()[0] {
                    let mut dims = buf.size();
                    dims[0] = n;
                    *buf = Tensor::zeros(dims.as_slice(), (buf.kind(), buf.device()));
                }
                buf.narrow(0, 0, n).narrow(2, 0, len).copy_(&picked);
            }
        }
        fill.rows = n;
    }
}

/// A zero buffer of `rows` × `positions` holding `b`'s first `kept` rows'
/// first `filled` positions.
fn grown(b: &Tensor, kept: i64, filled: i64, rows: i64, positions: i64) -> Tensor {
    let mut dims = b.size();
    dims[0] = dims[0].max(rows);
    dims[2] = dims[2].max(positions);
    let n = Tensor::zeros(dims.as_slice(), (b.kind(), b.device()));
    n.narrow(0, 0, kept).narrow(2, 0, filled).copy_(&b.narrow(0, 0, kept).narrow(2, 0, filled));
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rows: i64, positions: i64) -> CacheShape {
        CacheShape { layers: 2, rows, positions, kv_heads: 2, head_dim: 4, kind: Kind::Float, device: Device::Cpu }
    }

    /// Appends the same steps to a growing and a static cache (with a row
    /// selection in between) and checks every returned view is equal.
    fn same_as_growing(mut fixed: KvCache) {
        let mut grow = KvCache::new(2);
        let step = |b: i64, t: i64, seed: i64| {
            tch::manual_seed(seed);
            (
                Tensor::randn([b, 2, t, 4], (Kind::Float, Device::Cpu)),
                Tensor::randn([b, 2, t, 4], (Kind::Float, Device::Cpu)),
            )
        };
        let check = |a: (Tensor, Tensor), b: (Tensor, Tensor)| {
            assert!(a.0.equal(&b.0) && a.1.equal(&b.1));
        };
        // A prefill of 2 distinct prompts, copied to 4 rows, 3 decode steps,
        // then row 2 dropped and 2 more steps.
        for layer in 0..2 {
            let (k, v) = step(2, 5, layer as i64);
            check(grow.append(layer, k.copy(), v.copy()), fixed.append(layer, k, v));
        }
        let slot = Tensor::from_slice(&[0i64, 0, 1, 1]);
        grow.select_rows(&slot);
        fixed.select_rows(&slot);
        let mut seed = 10;
        for round in 0..2 {
            for _ in 0..(3 - round) {
                for layer in 0..2 {
                    let rows = if round == 0 { 4 } else { 3 };
                    let (k, v) = step(rows, 1, seed);
                    seed += 1;
                    check(grow.append(layer, k.copy(), v.copy()), fixed.append(layer, k, v));
                }
            }
            let keep = Tensor::from_slice(&[0i64, 1, 3]);
            if round == 0 {
                grow.select_rows(&keep);
                fixed.select_rows(&keep);
            }
        }
        assert_eq!(grow.len(), fixed.len());
        assert_eq!(fixed.len(), 10);
    }

    #[test]
    fn static_cache_returns_what_the_growing_one_does() {
        same_as_growing(KvCache::with_capacity(shape(4, 16)));
    }

    #[test]
    fn static_cache_grows_past_its_capacity() {
        // Too few rows for the copy to 4 and too few positions for the steps.
        let fixed = KvCache::with_capacity(shape(2, 6));
        same_as_growing(fixed);
    }

    #[test]
    fn reset_keeps_the_buffers() {
        let mut c = KvCache::with_capacity(shape(4, 16));
        let k = Tensor::ones([4, 2, 3, 4], (Kind::Float, Device::Cpu));
        let ptr = |c: &KvCache| c.layers[0].as_ref().unwrap().0.data_ptr();
        let before = ptr(&c);
        let _ = c.append(0, k.copy(), k.copy());
        let _ = c.append(1, k.copy(), k.copy());
        assert_eq!(c.len(), 3);
        c.reset();
        assert_eq!((c.len(), c.capacity()), (0, Some((4, 16))));
        let (k0, _) = c.append(0, k.copy(), k);
        assert_eq!(k0.size(), vec![4, 2, 3, 4]);
        assert_eq!(ptr(&c), before);
    }
}
