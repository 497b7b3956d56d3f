//! Plumbing the CPU kernels share: typed access to candle's CPU storage and one gemm entry point.

use candle_core::{CpuStorage, Layout, Result};

/// The f32 values of a contiguous CPU operand (`what`) of the op `op`.
pub(crate) fn f32_values<'a>(
    op: &str,
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("{op}: {what} must be f32 on CPU");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: {what} must be contiguous");
    };
    values
        .get(start..end)
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} reaches past its storage")))
}

/// `dst[m, n] = [dst +] beta · lhs[m, k] · rhs[k, n]` in f32, all matrices in memory with unit
/// column stride except rhs: lhs rows are `lhs_rs` apart, dst rows `dst_rs` apart, and rhs
/// element (p, j) is at `rhs[p * rhs_rs + j * rhs_cs]` (so a transposed rhs is just strides).
/// `accumulate` adds to dst instead of overwriting it.
///
/// # Safety
/// Every `lhs[i * lhs_rs + p]`, `rhs[p * rhs_rs + j * rhs_cs]` and `dst[i * dst_rs + j]` with
/// `i < m`, `p < k`, `j < n` must be in bounds, and no other thread may touch those dst elements.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        1,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        1.0,
        beta,
        false,
        false,
        false,
        parallelism,
    )
}
