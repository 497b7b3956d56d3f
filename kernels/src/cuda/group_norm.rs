//! Launch of kernels/cuda/group_norm.cu (GroupNorm + optional SiLU, f32 statistics).

use super::{dtype_suffix, sub_slice, u32_arg};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
const OP: &str = "kiln-group-norm";
/// group_norm.cu's THREADS.
const THREADS: u32 = 1024;

/// The input's shape as the kernel sees it: `[batch, channels, spatial]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub(crate) batch: usize,
    pub(crate) channels: usize,
    pub(crate) groups: usize,
    pub(crate) spatial: usize,
}

/// GroupNorm of contiguous `x` (`[batch, channels, ...]`, f32/f16/bf16) with per-channel
/// `weight`/`bias` in x's dtype or f32; SiLU after it when `silu`. Shapes are checked by the op.
pub(crate) fn forward(
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    (bs, bl): (&CudaStorage, &Layout),
    dims: Dims,
    eps: f32,
    silu: bool,
) -> Result<CudaStorage> {
    let (x_dtype, w_dtype) = (xs.dtype(), ws.dtype());
    if bs.dtype() != w_dtype || !(w_dtype == x_dtype || w_dtype == DType::F32) {
        candle_core::bail!(
            "{OP}: weight {w_dtype:?} / bias {:?} must both be f32 or the input's {x_dtype:?}",
            bs.dtype()
        );
    }
    let mut name = format!("kiln_group_norm_{}", dtype_suffix(OP, x_dtype)?);
    if w_dtype != x_dtype {
        name.push_str("_wf32");
    }
    let range = |l: &Layout, what: &str| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: {what} must be contiguous")))
    };
    let ranges = [range(xl, "input")?, range(wl, "weight")?, range(bl, "bias")?];
    let args = Args { name, ranges, dims, eps, silu };
    let dev = &xs.device;
    use CudaStorageSlice as S;
    let slice = match (&xs.slice, &ws.slice, &bs.slice) {
        (S::F32(x), S::F32(w), S::F32(b)) => S::F32(launch(dev, x, (w, b), &args)?),
        (S::F16(x), S::F16(w), S::F16(b)) => S::F16(launch(dev, x, (w, b), &args)?),
        (S::F16(x), S::F32(w), S::F32(b)) => S::F16(launch(dev, x, (w, b), &args)?),
        (S::BF16(x), S::BF16(w), S::BF16(b)) => S::BF16(launch(dev, x, (w, b), &args)?),
        (S::BF16(x), S::F32(w), S::F32(b)) => S::BF16(launch(dev, x, (w, b), &args)?),
        _ => candle_core::bail!("{OP}: input {x_dtype:?} with affine {w_dtype:?} is not supported on CUDA"),
    };
    Ok(CudaStorage { slice, device: dev.clone() })
}

struct Args {
    name: String,
    /// Contiguous element ranges of x, weight and bias in their storages.
    ranges: [(usize, usize); 3],
    dims: Dims,
    eps: f32,
    silu: bool,
}

fn launch<T: CudaDType + DeviceRepr, W: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    x: &CudaSlice<T>,
    (weight, bias): (&CudaSlice<W>, &CudaSlice<W>),
    args: &Args,
) -> Result<CudaSlice<T>> {
    let Dims { batch, channels, groups, spatial } = args.dims;
    let n = batch * channels * spatial;
    let [(x0, x1), (w0, w1), (b0, b1)] = args.ranges;
    if x1 - x0 != n || w1 - w0 != channels || b1 - b0 != channels || groups == 0 || channels % groups != 0 {
        candle_core::bail!("{OP}: operands do not match {:?}", args.dims);
    }
    // SAFETY (of the uninitialised buffer): one block per (batch, group) writes every element of
    // its group, so all n elements are written. (At least one element: the driver refuses empty
    // allocations; an empty output's spare element is never read.)
    #[allow(unsafe_code)]
    let mut out = unsafe { dev.alloc::<T>(n.max(1)) }?;
    if n == 0 {
        return Ok(out);
    }
    let (xv, wv, bv) =
        (sub_slice(OP, x, x0..x1)?, sub_slice(OP, weight, w0..w1)?, sub_slice(OP, bias, b0..b1)?);
    // Per-group element counts are u32 inside the kernel.
    u32_arg(OP, "group size", channels / groups * spatial)?;
    let blocks = u32_arg(OP, "batch * groups", batch * groups)?;
    if blocks > i32::MAX as u32 {
        candle_core::bail!("{OP}: {blocks} blocks exceed CUDA's grid limit");
    }
    let scalars = [
        u32_arg(OP, "channels", channels)?,
        u32_arg(OP, "groups", groups)?,
        u32_arg(OP, "spatial", spatial)?,
    ];
    let silu = i32::from(args.silu);
    let func = dev.get_or_load_custom_func(&args.name, "kiln_group_norm", PTX)?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    let mut builder = func.builder();
    builder.arg(&xv);
    builder.arg(&wv);
    builder.arg(&bv);
    builder.arg(&mut out);
    for s in &scalars {
        builder.arg(s);
    }
    builder.arg(&args.eps);
    builder.arg(&silu);
    // SAFETY: the arguments match group_norm.cu's signature (x, weight, bias, out pointers; three
    // unsigned ints; a float; an int); x/out hold batch * channels * spatial elements and
    // weight/bias `channels`, checked above, which is all the kernel indexes.
    #[allow(unsafe_code)]
    unsafe { builder.launch(cfg) }.w()?;
    Ok(out)
}
