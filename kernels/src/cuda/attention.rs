//! Launch of kernels/cuda/attention.cu (flash-attention-style forward, f32 accumulation).

use super::{dtype_suffix, sub_slice, u32_arg};
use crate::attention::View;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const OP: &str = "kiln-attention";

/// The kernels attention.cu instantiates, as (padded head size, query rows per block, threads
/// per block); `kiln_attention_d{padded}_{dtype}` serves heads up to `padded` wide.
const VARIANTS: [(usize, usize, u32); 8] = [
    (32, 16, 128),
    (40, 16, 128),
    (64, 16, 128),
    (80, 16, 256),
    (128, 16, 256),
    (160, 8, 256),
    (256, 8, 256),
    (512, 8, 256),
];

/// Widest q/k or v head the kernels take.
pub(crate) const MAX_HEAD_DIM: usize = 512;

/// False when `KILN_CUDA_ATTENTION=composed`: CUDA attention then takes candle's composed ops
/// (cuBLAS matmuls, full score matrix), so the two can be timed against each other in one build.
pub(crate) fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("KILN_CUDA_ATTENTION").map_or(true, |v| v != "composed"))
}

/// `softmax(q·kᵀ·scale [+ causal mask])·v` for operands already checked against each other
/// (`AttentionOp::views`); the output is written with `out_strides` (batch, head, token) in a new
/// buffer of `batch * heads * q_tokens * v_dim` elements.
pub(crate) fn forward(
    [(qs, qv), (ks, kv), (vs, vv)]: [(&CudaStorage, &View); 3],
    out_strides: [usize; 3],
    scale: f32,
    causal: bool,
) -> Result<CudaStorage> {
    let dtype = qs.dtype();
    if ks.dtype() != dtype || vs.dtype() != dtype {
        candle_core::bail!("{OP}: q {dtype:?}, k {:?}, v {:?} must share one dtype", ks.dtype(), vs.dtype());
    }
    let suffix = dtype_suffix(OP, dtype)?;
    let dev = &qs.device;
    let args = Args { views: [qv, kv, vv], out_strides, scale, causal, suffix };
    let slice = match (&qs.slice, &ks.slice, &vs.slice) {
        (CudaStorageSlice::F32(q), CudaStorageSlice::F32(k), CudaStorageSlice::F32(v)) => {
            CudaStorageSlice::F32(launch(dev, [q, k, v], &args)?)
        }
        (CudaStorageSlice::F16(q), CudaStorageSlice::F16(k), CudaStorageSlice::F16(v)) => {
            CudaStorageSlice::F16(launch(dev, [q, k, v], &args)?)
        }
        (CudaStorageSlice::BF16(q), CudaStorageSlice::BF16(k), CudaStorageSlice::BF16(v)) => {
            CudaStorageSlice::BF16(launch(dev, [q, k, v], &args)?)
        }
        _ => candle_core::bail!("{OP}: {dtype:?} is not supported on CUDA"),
    };
    Ok(CudaStorage { slice, device: dev.clone() })
}

struct Args<'a> {
    views: [&'a View; 3],
    out_strides: [usize; 3],
    scale: f32,
    causal: bool,
    suffix: &'static str,
}

fn launch<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    slices: [&CudaSlice<T>; 3],
    args: &Args,
) -> Result<CudaSlice<T>> {
    let [qv, kv, vv] = args.views;
    for (slice, view, what) in [(slices[0], qv, "q"), (slices[1], kv, "k"), (slices[2], vv, "v")] {
        if view.extent() > slice.len() {
            candle_core::bail!("{OP}: the {what} layout reaches past its storage");
        }
    }
    let (batch, heads, n_q, n_k, d, dv) = (qv.batch, qv.heads, qv.tokens, kv.tokens, qv.dim, vv.dim);
    let n_out = batch * heads * n_q * dv;
    // SAFETY (of the uninitialised buffer): the kernel writes every (batch, head, query, v dim)
    // element, i.e. all n_out of them with the strides `output` gives. (At least one element:
    // the driver refuses empty allocations; an empty output's spare element is never read.)
    #[allow(unsafe_code)]
    let mut out = unsafe { dev.alloc::<T>(n_out.max(1)) }?;
    if n_out == 0 {
        return Ok(out);
    }
    let width = d.max(dv);
    let Some(&(padded, rows, threads)) = VARIANTS.iter().find(|v| v.0 >= width) else {
        candle_core::bail!("{OP}: head size {width} is over the CUDA kernel's {MAX_HEAD_DIM}");
    };
    let blocks = u32_arg(OP, "blocks", batch * heads * n_q.div_ceil(rows))?;
    if blocks > i32::MAX as u32 {
        candle_core::bail!("{OP}: {blocks} blocks exceed CUDA's grid limit");
    }
    let scalars = [
        u32_arg(OP, "heads", heads)?,
        u32_arg(OP, "q tokens", n_q)?,
        u32_arg(OP, "kv tokens", n_k)?,
        u32_arg(OP, "head size", d)?,
        u32_arg(OP, "v head size", dv)?,
    ];
    // The kernel works in the log2 domain: exp2(s * log2(e)) = exp(s).
    let scale_log2 = args.scale * std::f32::consts::LOG2_E;
    let causal = i32::from(args.causal);
    let [osb, osh, osn] = args.out_strides;
    let strides: [u64; 12] =
        [qv.sb, qv.sh, qv.sn, kv.sb, kv.sh, kv.sn, vv.sb, vv.sh, vv.sn, osb, osh, osn].map(|s| s as u64);
    let (q, k, v) = (
        sub_slice(OP, slices[0], qv.offset..slices[0].len())?,
        sub_slice(OP, slices[1], kv.offset..slices[1].len())?,
        sub_slice(OP, slices[2], vv.offset..slices[2].len())?,
    );
    let func = dev.get_or_load_custom_func(
        &format!("kiln_attention_d{padded}_{}", args.suffix),
        "kiln_attention",
        PTX,
    )?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let mut builder = func.builder();
    builder.arg(&q);
    builder.arg(&k);
    builder.arg(&v);
    builder.arg(&mut out);
    for s in &scalars {
        builder.arg(s);
    }
    builder.arg(&scale_log2);
    builder.arg(&causal);
    for s in &strides {
        builder.arg(s);
    }
    // SAFETY: the arguments match attention.cu's signature (four T pointers, five unsigned ints,
    // a float, an int, twelve u64 strides); every element the kernel reads lies inside its view
    // (extents checked above, head dims d/dv as the views say) and it writes only `out`'s n_out.
    #[allow(unsafe_code)]
    unsafe { builder.launch(cfg) }.w()?;
    Ok(out)
}
