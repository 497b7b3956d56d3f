//! Plumbing the CPU kernels share: typed access to candle's CPU storage and one gemm entry point.

use candle_core::{CpuStorage, Layout, Result, Storage};

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

/// [`f32_values`] of a tensor's storage, which must be on the CPU.
pub(crate) fn cpu_slice<'a>(op: &str, storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(cpu) => f32_values(op, "tensor", cpu, layout),
        _ => candle_core::bail!("{op}: needs a CPU f32 tensor"),
    }
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

/// Asks the kernel to back `buf` with transparent huge pages where it allows them on request
/// (`madvise` mode, a common default): a large buffer about to be written for the first time
/// then costs one fault per 2 MiB instead of one per 4 KiB. The first LoRA switch of a process,
/// which lays out ~1 GB of merged weights in new memory, took 1.3-1.7x as long as later ones
/// that reuse freed memory; this took about a tenth off it. Only the whole 2 MiB pages inside
/// `buf` are advised; a no-op elsewhere and for small buffers.
pub(crate) fn advise_huge_pages<T>(buf: &mut [T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let (first, last) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if last > first {
            #[allow(unsafe_code)]
            // SAFETY: [first, last) lies inside `buf`, which this caller owns; MADV_HUGEPAGE
            // changes only how the range is backed, never its contents. A refusal (no THP
            // support) leaves the default 4 KiB pages, so the result is ignored.
            unsafe {
                libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}
