//! GPU ranks sum with NCCL. cudarc loads `libnccl.so` at run time
//! (`dynamic-loading`), so the build needs no CUDA and a CPU worker never
//! touches it. The communicator is bootstrapped through another
//! collective (the coordinator relay): rank 0 makes the NCCL unique id and
//! every rank gets it with `gather`.

use std::sync::Arc;

use cudarc::driver::CudaContext;
use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use super::{scatter_into, Collective};
use crate::error::{Error, Result};

/// Whether `libnccl.so` can be loaded here.
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { sys::is_culib_present() }
}

/// The loaded NCCL's version code (e.g. 22703 for 2.27.3); works without a GPU.
pub fn version() -> Result<i32> {
    if !available() {
        return Err(Error::Collective(
            "libnccl.so not found (install NCCL, or build where torch's nvidia-nccl wheel is)".into(),
        ));
    }
    result::get_nccl_version().map_err(|e| Error::Collective(format!("ncclGetVersion: {e:?}")))
}

pub struct NcclRank {
    comm: sys::ncclComm_t,
    ordinal: usize,
    /// Keeps this device's CUDA context current for NCCL.
    _ctx: Arc<CudaContext>,
    boot: Box<dyn Collective>,
}

// SAFETY: the communicator is used by one thread at a time (the job's).
unsafe impl Send for NcclRank {}

impl NcclRank {
    /// Joins the NCCL group of `boot`'s ranks on `device`.
    pub fn init(mut boot: Box<dyn Collective>, device: Device) -> Result<Self> {
        let Device::Cuda(ordinal) = device else {
            return Err(Error::Collective(format!("nccl needs a cuda device, this rank runs on {device:?}")));
        };
        version()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::Collective(format!("cuda context {ordinal}: {e:?}")))?;
        let mine = if boot.rank() == 0 {
            let id = result::get_uniqueid().map_err(|e| Error::Collective(format!("ncclGetUniqueId: {e:?}")))?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let ids = boot.gather(mine)?;
        let id_bytes =
            ids.first().filter(|b| b.len() == 128).ok_or_else(|| Error::Collective("rank 0 sent no NCCL id".into()))?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (d, &s) in id.internal.iter_mut().zip(id_bytes) {
            *d = s as _;
        }
        let mut comm = std::ptr::null_mut();
        ctx.bind_to_thread().map_err(|e| Error::Collective(format!("cuda context {ordinal}: {e:?}")))?;
        // SAFETY: `comm` is written by NCCL; the id came from rank 0.
        unsafe { result::comm_init_rank(&mut comm, boot.world() as i32, id, boot.rank() as i32) }.map_err(|e| {
            Error::Collective(format!("ncclCommInitRank (rank {} of {}): {e:?}", boot.rank(), boot.world()))
        })?;
        tracing::info!(rank = boot.rank(), world = boot.world(), ordinal, "nccl communicator ready");
        Ok(Self { comm, ordinal, _ctx: ctx, boot })
    }
}

impl Drop for NcclRank {
    fn drop(&mut self) {
        // SAFETY: made by comm_init_rank, destroyed once.
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}

impl Collective for NcclRank {
    fn rank(&self) -> usize {
        self.boot.rank()
    }
    fn world(&self) -> usize {
        self.boot.world()
    }
    fn sum_f32(&mut self, v: Vec<f32>) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(&v).to_device(Device::Cuda(self.ordinal));
        self.all_reduce(std::slice::from_ref(&t))?;
        Ok(Vec::<f32>::try_from(&t.to_device(Device::Cpu))?)
    }
    fn gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.boot.gather(bytes)
    }
    /// One NCCL all-reduce over the tensors packed into one f32 buffer.
    fn all_reduce(&mut self, tensors: &[Tensor]) -> Result<()> {
        let device = Device::Cuda(self.ordinal);
        let flat: Vec<Tensor> =
            tensors.iter().map(|t| t.detach().to_device(device).to_kind(Kind::Float).reshape([-1])).collect();
        let buf = Tensor::cat(&flat, 0).contiguous();
        tch::Cuda::synchronize(self.ordinal as i64);
        let ptr = buf.data_ptr();
        // SAFETY: `buf` is a contiguous f32 CUDA buffer of numel elements on
        // this communicator's device; the legacy default stream orders NCCL
        // after torch's kernels, and we synchronize before reading it.
        unsafe {
            result::all_reduce(
                ptr,
                ptr,
                buf.numel(),
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        }
        .map_err(|e| Error::Collective(format!("ncclAllReduce: {e:?}")))?;
        tch::Cuda::synchronize(self.ordinal as i64);
        scatter_into(tensors, &buf)
    }
}

/// `bench allreduce`: a one-rank NCCL group on `device` sums `megabytes`
/// of f32 (the size of an adapter's gradients) `runs` times; checks the
/// result and reports the version, time per call and GB/s as JSON.
pub fn self_check(device: Device, megabytes: f64, runs: usize) -> Result<serde_json::Value> {
    let mut rank = NcclRank::init(Box::new(super::Single), device)?;
    let n = ((megabytes * 1e6) / 4.0).max(1.0) as i64;
    let want = Tensor::arange(n, (Kind::Float, device)).remainder(1000.0);
    let t = want.copy();
    rank.all_reduce(std::slice::from_ref(&t))?;
    let err = (&t - &want).abs().max().double_value(&[]);
    if err != 0.0 {
        return Err(Error::Collective(format!("one-rank all-reduce changed the values by {err}")));
    }
    let start = std::time::Instant::now();
    for _ in 0..runs.max(1) {
        rank.all_reduce(std::slice::from_ref(&t))?;
    }
    let secs = start.elapsed().as_secs_f64() / runs.max(1) as f64;
    Ok(serde_json::json!({
        "nccl_version": version()?,
        "device": format!("{device:?}"),
        "megabytes": n as f64 * 4.0 / 1e6,
        "ms_per_all_reduce": secs * 1e3,
        "gb_per_s": n as f64 * 4.0 / secs / 1e9,
        "max_abs_error": err,
    }))
}
