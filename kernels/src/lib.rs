//! kiln's fused kernels. Each kernel is a candle `CustomOp` whose `cpu_fwd` is the reference
//! implementation the CUDA/Metal versions are tested against. Backend code lives here and in
//! `kiln_core::device` only.
//!
//! (Kernels land with the GPU-path issue; the crate exists so features and layout are stable.)
