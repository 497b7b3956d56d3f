//! How the process's heap treats large freed blocks (set by the `kiln` binary and the benchmarks
//! first thing in `main`).

/// Keeps freed activation buffers in the heap for the next layer instead of returning them to
/// the kernel.
///
/// glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh mapping and
/// unmaps it on free, so each large activation of a denoiser or VAE is page-faulted and zeroed
/// again: about 15 % of a 256² SD-Turbo VAE decode on CPU (benches/RESULTS.md). Serving all
/// blocks from the heap and trimming its top only past 1 GiB lets the next layer reuse the
/// pages. Peak memory is unchanged; memory freed below the top stays with the process until it
/// exits, which is what a one-shot CLI run wants.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_blocks() {
    const TRIM_THRESHOLD: libc::c_int = 1 << 30;
    #[allow(unsafe_code)]
    // SAFETY: mallopt only sets allocator parameters; it is called first thing in main, before
    // any other thread exists. A rejected value just leaves glibc's default (return value 0).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Elsewhere the platform allocator keeps its defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_blocks() {}
