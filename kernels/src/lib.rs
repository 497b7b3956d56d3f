//! kiln's kernels. Backend-specific code lives here and in `kiln_core::device` only.
//!
//! - [`conv`]: 2-D convolution. On CPU (f32) an im2col + single-gemm kernel that builds the
//!   column matrix in cache-sized bands of output rows, several times faster than candle's
//!   tiled im2col on the shapes SD's VAE and Real-ESRGAN use; on CUDA with the `cudnn` feature
//!   cuDNN with descriptors, algorithms and workspace kept between calls; elsewhere candle's conv.
//! - [`blend`]: tile blend (accumulate a tile into an output strip with feather weights); the CPU
//!   reference is what the tiling planner runs, with a CUDA kernel under `cuda`.
//! - [`norm`]: GroupNorm (+ optional SiLU) fused into one pass per group on CPU, one kernel on
//!   CUDA (f32/f16/bf16); with its statistics known, an [`InputNorm`] that a conv applies as it
//!   reads its input, so the normalised map is never written out.
//! - [`attention`]: flash-attention-style fused attention (online softmax, never the full score
//!   matrix) on CPU (f32) and CUDA (f32/f16/bf16), candle's composed ops elsewhere.
//! - [`linear`]: Linear as one gemm pass per thread block, bias and GELU/GEGLU fused in; layers
//!   can be concatenated (fused q/k/v projections).
//! - [`lowrank`]: LoRA updates merged into a weight by one gemm each, straight into the
//!   transposed layout `Linear` keeps (candle's composed merge is the reference).
//! - [`fastmath`]: vectorisable `exp` and erf-GELU used by those kernels.
//! - [`winograd`]: 3x3 stride-1 padding-1 convolution by Winograd F(4x4, 3x3) on CPU f32 with a
//!   fused bias/activation/residual epilogue; [`Conv2d`] picks it where it beats im2col (its input
//!   transformed band by band, optionally through an [`InputNorm`]), and the SR nets use its
//!   [`Conv3x3`] layer.
//! - [`resample`]: bilinear resize and 2×2 ceil-mode max-pool of feature maps, one plane per
//!   task on CPU (candle's ops run every plane on one thread), bit-identical to candle's.
//!
//! - [`embedding`]: token lookup whose table may be read in place from a mapping.
//! - [`host`]: layer weights as plain host values, owned or a range of a read-only file mapping
//!   (pre-laid-out weights used in place, shared with the page cache).
//! - [`reuse`]: derived layer weights (transposed copies, Winograd transforms) shared by models
//!   rebuilt from the same weights, e.g. when a warm model's LoRA set changes.
//!
//! Every kernel is a candle `CustomOp` whose reference is candle's composed implementation, and
//! the tests compare the two.

pub mod attention;
pub mod blend;
pub mod conv;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod embedding;
pub mod fastmath;
pub mod host;
pub mod linear;
pub mod lowrank;
#[cfg_attr(not(all(feature = "cudnn", not(test))), allow(dead_code))]
mod lru;
pub mod norm;
pub mod resample;
pub mod reuse;
pub mod winograd;

#[cfg(test)]
mod test_util;

pub use attention::{attention, attention_bnc, attention_is_fused, attention_reference};
pub use blend::{blend_tile, blend_tile_slice, BlendRegion};
pub use conv::{conv2d, Conv2d};
pub use embedding::Embedding;
pub use host::{HostF32, HostValues, LayerValues};
pub use linear::{linear, linear_no_bias, Epilogue, Linear};
pub use norm::{group_norm, GroupNorm, InputNorm};
pub use winograd::{conv3x3_winograd, Act, Conv3x3, WinoInput, WinogradWeights};
