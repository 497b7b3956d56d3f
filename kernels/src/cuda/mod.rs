//! CUDA launches of the fused kernels in kernels/cuda/ (PTX compiled by build.rs under the
//! `cuda` feature, JIT-compiled by the driver and loaded once per device).
//!
//! - [`attention`]: kernels/cuda/attention.cu for [`crate::attention`]'s op;
//! - [`group_norm`]: kernels/cuda/group_norm.cu for [`crate::norm::GroupNorm`];
//! - [`cudnn`] (the `cudnn` feature): cuDNN forward convolution with kept descriptors, algorithms
//!   and workspace for [`crate::conv`].
//!
//! The tile blend kernel keeps its launch beside its op in [`crate::blend`].

pub(crate) mod attention;
#[cfg(feature = "cudnn")]
pub(crate) mod cudnn;
pub(crate) mod group_norm;

#[cfg(test)]
mod tests;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::Result;

/// Elements `range` of `slice`, or an error naming `op` if they lie past its end.
fn sub_slice<'a, T: DeviceRepr>(
    op: &str,
    slice: &'a CudaSlice<T>,
    range: std::ops::Range<usize>,
) -> Result<CudaView<'a, T>> {
    slice
        .try_slice(range)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: a layout reaches past its storage")))
}

/// `v` as a kernel's `unsigned int` argument.
fn u32_arg(op: &str, what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{op}: {what} = {v} exceeds u32")))
}

/// The kernel-name suffix of a dtype the kernels take.
fn dtype_suffix(op: &str, dtype: candle_core::DType) -> Result<&'static str> {
    match dtype {
        candle_core::DType::F32 => Ok("f32"),
        candle_core::DType::F16 => Ok("f16"),
        candle_core::DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("{op}: {other:?} is not supported on CUDA (f32, f16, bf16)"),
    }
}
