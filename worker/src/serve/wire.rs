//! Tensors ⇄ `TensorData` for role calls.

use rlhf_proto::TensorData;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

pub fn to_wire(name: &str, t: &Tensor) -> Result<TensorData> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let shape = t.size();
    let flat = t.reshape([-1]);
    Ok(match t.kind() {
        Kind::Int64 | Kind::Int | Kind::Bool | Kind::Uint8 => TensorData {
            name: name.to_string(),
            shape,
            f32: Vec::new(),
            i64: Vec::try_from(&flat.to_kind(Kind::Int64))?,
        },
        _ => TensorData {
            name: name.to_string(),
            shape,
            f32: Vec::try_from(&flat.to_kind(Kind::Float))?,
            i64: Vec::new(),
        },
    })
}

pub fn from_wire(d: &TensorData) -> Result<(String, Tensor)> {
    let n: i64 = d.shape.iter().product();
    let t = if !d.i64.is_empty() || (d.f32.is_empty() && n == 0) {
        Tensor::from_slice(&d.i64)
    } else {
        Tensor::from_slice(&d.f32)
    };
    if t.numel() as i64 != n {
        return Err(Error::InvalidArgument(format!("tensor {}: {} values for shape {:?}", d.name, t.numel(), d.shape)));
    }
    Ok((d.name.clone(), t.view(d.shape.as_slice())))
}

/// Payload bytes of tensors on the wire.
pub fn bytes(ts: &[TensorData]) -> u64 {
    ts.iter().map(|t| (t.f32.len() * 4 + t.i64.len() * 8) as u64).sum()
}

pub fn to_wire_all(ts: &[(String, Tensor)]) -> Result<Vec<TensorData>> {
    ts.iter().map(|(n, t)| to_wire(n, t)).collect()
}

pub fn from_wire_all(ts: &[TensorData]) -> Result<Vec<(String, Tensor)>> {
    ts.iter().map(from_wire).collect()
}
