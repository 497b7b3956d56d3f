//! kiln's kernels. Backend-specific code lives here and in `kiln_core::device` only.
//!
//! - [`conv`]: 2-D convolution. On CPU (f32) an im2col + single-gemm kernel that builds the
//!   column matrix in cache-sized bands of output rows, several times faster than candle's
//!   tiled im2col on the shapes SD's VAE and Real-ESRGAN use; elsewhere candle's own conv
//!   (cuDNN on CUDA when the `cudnn` feature is on).
//! - [`norm`]: GroupNorm (+ optional SiLU) fused into one pass per group on CPU.
//! - [`winograd`]: 3x3 stride-1 padding-1 convolution by Winograd F(4x4, 3x3) on CPU f32 with a
//!   fused bias/activation/residual epilogue; [`Conv2d`] picks it where it beats im2col, and the
//!   SR nets use its [`Conv3x3`] layer.
//!
//! Every kernel is a candle `CustomOp` whose reference is candle's composed implementation, and
//! the tests compare the two.

pub mod conv;
pub mod norm;
pub mod winograd;

pub use conv::{conv2d, Conv2d};
pub use norm::{group_norm, GroupNorm};
pub use winograd::{conv3x3_winograd, Act, Conv3x3, WinoInput, WinogradWeights};
