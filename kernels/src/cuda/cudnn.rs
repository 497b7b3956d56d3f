//! cuDNN forward convolution for [`crate::conv`]'s op (the `cudnn` feature), with its set-up kept
//! between calls. candle's own cuDNN conv keeps only the handle: every call builds the tensor,
//! filter and convolution descriptors, asks cuDNN for an algorithm and allocates a zeroed
//! workspace. Here, per CUDA device (candle `DeviceId`):
//! - one cuDNN handle and one workspace buffer that only grows (to the largest size a kept plan
//!   needs, rounded up to 1 MiB) and is never cleared: cuDNN uses it as scratch;
//! - a plan per (dtype, math mode, input shape, weight shape, stride, padding): the descriptors and
//!   the algorithm, chosen once by cuDNN's heuristics (`cudnnGetConvolutionForwardAlgorithm_v7`,
//!   its first choice; then implicit precomputed GEMM, then implicit GEMM, when a choice needs more
//!   than [`MAX_WORKSPACE_BYTES`] of workspace). Not a timed Find: its pick can change from run to
//!   run (timing noise) and with it the output's bits, which would break bit-exact replays.
//!
//! Bounds: at most [`PLAN_CAPACITY`] plans per device and [`DEVICE_CAPACITY`] devices, least
//! recently used evicted first, so varying image sizes cannot grow the cache without end.
//!
//! Numerics: f32 with FMA maths only (no TF32), unless candle's
//! `set_gemm_reduced_precision_f32(true)` allows TF32 for matmuls too; f16/bf16 data with f32
//! accumulation (cuDNN's PSEUDO_HALF / PSEUDO_BFLOAT16 configurations; candle's conv accumulates
//! f16 in f16) and tensor cores allowed.
//!
//! Threads: the cache sits behind one mutex. cuDNN handles may be used from any thread, never by
//! two at once; the mutex is held from the plan look-up to the (asynchronous) launch. candle's
//! `Device::new_cuda` streams are per-thread streams, so when the thread using a device's
//! workspace changes, the context is synchronised first (the last thread's convolutions may
//! still be running in the buffer).

use super::sub_slice;
use crate::lru::LruMap;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{
    sys, ConvDescriptor, ConvForward, Cudnn, CudnnDataType, FilterDescriptor, TensorDescriptor,
};
use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaStorageSlice, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, WithDType};
use half::{bf16, f16};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::ThreadId;

const OP: &str = "kiln-conv2d (cuDNN)";

/// Plans kept per device. SD's UNet and VAE need a few dozen distinct convolutions per image
/// size, so this keeps several sizes' worth.
pub(crate) const PLAN_CAPACITY: usize = 256;

/// Devices (candle `CudaDevice`s, each with its own handle and workspace) kept.
pub(crate) const DEVICE_CAPACITY: usize = 8;

/// Largest workspace an algorithm may ask for (FFT algorithms can ask for gigabytes).
pub(crate) const MAX_WORKSPACE_BYTES: usize = 1 << 30;

/// Workspace sizes are rounded up to this, so small increases do not reallocate one by one.
const WORKSPACE_GRANULE: usize = 1 << 20;

/// False when `KILN_CUDA_CONV=candle`: CUDA convolutions then take candle's conv (cuDNN without
/// kept plans), so the two can be timed against each other in one build.
pub(crate) fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("KILN_CUDA_CONV").map_or(true, |v| v != "candle"))
}

/// One convolution's shapes (NCHW input, OIHW weight, groups = 1, dilation = 1), checked by the op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvShape {
    pub(crate) input: [usize; 4],
    pub(crate) weight: [usize; 4],
    pub(crate) output: [usize; 4],
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

/// What a device's cache holds and has done (for tests and diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    pub(crate) plans: usize,
    pub(crate) hits: u64,
    pub(crate) misses: u64,
    pub(crate) evictions: u64,
    pub(crate) workspace_bytes: usize,
}

/// The stats of `dev`'s cache, or `None` if no convolution has run on it (or it was evicted).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn cache_stats(dev: &CudaDevice) -> Option<CacheStats> {
    let mut caches = lock();
    caches.get(&dev.id()).map(|c| CacheStats {
        plans: c.plans.len(),
        workspace_bytes: c.workspace.as_ref().map_or(0, |w| w.len()),
        ..c.stats
    })
}

/// `input ⋆ weight` (cross-correlation) of contiguous f32/f16/bf16 operands of one dtype.
pub(crate) fn forward(
    (xs, xl): (&CudaStorage, &Layout),
    (ws, wl): (&CudaStorage, &Layout),
    shape: ConvShape,
) -> Result<CudaStorage> {
    let range = |l: &Layout, what: &str, dims: [usize; 4]| {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{OP}: the {what} must be contiguous")))?;
        if end - start != dims.iter().product::<usize>() {
            candle_core::bail!("{OP}: the {what}'s layout does not hold {dims:?}");
        }
        Ok(start..end)
    };
    let x_range = range(xl, "input", shape.input)?;
    let w_range = range(wl, "weight", shape.weight)?;
    let dev = &xs.device;
    use CudaStorageSlice as S;
    let slice = match (&xs.slice, &ws.slice) {
        (S::F32(x), S::F32(w)) => S::F32(launch(dev, (x, x_range), (w, w_range), shape)?),
        (S::F16(x), S::F16(w)) => S::F16(launch(dev, (x, x_range), (w, w_range), shape)?),
        (S::BF16(x), S::BF16(w)) => S::BF16(launch(dev, (x, x_range), (w, w_range), shape)?),
        _ => candle_core::bail!(
            "{OP}: input {:?} with weight {:?} is not supported (f32, f16 or bf16, both alike)",
            xs.dtype(),
            ws.dtype()
        ),
    };
    Ok(CudaStorage { slice, device: dev.clone() })
}

/// A dtype cuDNN convolves here, and its place in [`PlanDescs`].
trait ConvType: CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType {
    fn wrap(descs: Descs<Self>) -> PlanDescs;
    fn descs(plan: &PlanDescs) -> Option<&Descs<Self>>;
    /// The convolution descriptor's math type for this dtype.
    fn math_type() -> sys::cudnnMathType_t;
}

impl ConvType for f32 {
    fn wrap(descs: Descs<Self>) -> PlanDescs {
        PlanDescs::F32(descs)
    }
    fn descs(plan: &PlanDescs) -> Option<&Descs<Self>> {
        match plan {
            PlanDescs::F32(d) => Some(d),
            _ => None,
        }
    }
    fn math_type() -> sys::cudnnMathType_t {
        // TF32 only where candle allows it for f32 matmuls too.
        if candle_core::cuda_backend::gemm_reduced_precision_f32() {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        }
    }
}

impl ConvType for f16 {
    fn wrap(descs: Descs<Self>) -> PlanDescs {
        PlanDescs::F16(descs)
    }
    fn descs(plan: &PlanDescs) -> Option<&Descs<Self>> {
        match plan {
            PlanDescs::F16(d) => Some(d),
            _ => None,
        }
    }
    fn math_type() -> sys::cudnnMathType_t {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    }
}

impl ConvType for bf16 {
    fn wrap(descs: Descs<Self>) -> PlanDescs {
        PlanDescs::BF16(descs)
    }
    fn descs(plan: &PlanDescs) -> Option<&Descs<Self>> {
        match plan {
            PlanDescs::BF16(d) => Some(d),
            _ => None,
        }
    }
    fn math_type() -> sys::cudnnMathType_t {
        sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
    }
}

/// A plan's descriptors; the convolution computes in f32 for every data type.
struct Descs<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

enum PlanDescs {
    F32(Descs<f32>),
    F16(Descs<f16>),
    BF16(Descs<bf16>),
}

struct Plan {
    descs: PlanDescs,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace_bytes: usize,
}

/// dtype, whether TF32 is allowed (f32 only), shapes.
type PlanKey = (DType, bool, ConvShape);

struct DeviceCache {
    /// The device's context (kept alive with the cache) for synchronising.
    ctx: Arc<CudaContext>,
    handle: Arc<Cudnn>,
    plans: LruMap<PlanKey, Plan>,
    workspace: Option<CudaSlice<u8>>,
    /// The thread that launched the last convolution (see the module notes).
    last_thread: Option<ThreadId>,
    stats: CacheStats,
}

/// The caches of every device, movable between threads.
struct SendCaches(LruMap<DeviceId, DeviceCache>);

// SAFETY: the map is not `Send` only because cudarc's cuDNN handle (`Arc<Cudnn>`, also held by
// every descriptor) and descriptors wrap raw pointers. cuDNN allows a handle and its descriptors
// to be used from any thread as long as no two threads use them at once, and the only access is
// through `CACHES`' mutex: the handle, the descriptors and the `Arc`'s count are only touched (and
// dropped) by the thread holding it.
#[allow(unsafe_code)]
unsafe impl Send for SendCaches {}

impl std::ops::Deref for SendCaches {
    type Target = LruMap<DeviceId, DeviceCache>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for SendCaches {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

fn lock() -> std::sync::MutexGuard<'static, SendCaches> {
    static CACHES: OnceLock<Mutex<SendCaches>> = OnceLock::new();
    let caches = CACHES.get_or_init(|| Mutex::new(SendCaches(LruMap::new(DEVICE_CAPACITY))));
    // A panic while holding the lock leaves at worst a plan or workspace that was being replaced:
    // the entries themselves are always whole, so the caches stay usable.
    caches.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn launch<T: ConvType>(
    dev: &CudaDevice,
    (x, x_range): (&CudaSlice<T>, std::ops::Range<usize>),
    (w, w_range): (&CudaSlice<T>, std::ops::Range<usize>),
    shape: ConvShape,
) -> Result<CudaSlice<T>> {
    let n_out: usize = shape.output.iter().product();
    // SAFETY (of the uninitialised buffer): with beta = 0 cuDNN writes every output element and
    // reads none. (At least one element: the driver refuses empty allocations.)
    #[allow(unsafe_code)]
    let mut out = unsafe { dev.alloc::<T>(n_out.max(1)) }?;
    if n_out == 0 || x_range.is_empty() || w_range.is_empty() {
        // Nothing to convolve (zero channels give zeros, like the CPU reference).
        return if n_out == 0 { Ok(out) } else { dev.alloc_zeros::<T>(n_out) };
    }
    let (xv, wv) = (sub_slice(OP, x, x_range)?, sub_slice(OP, w, w_range)?);
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;

    let mut caches = lock();
    if !caches.contains(&dev.id()) {
        let cache = DeviceCache {
            ctx: ctx.clone(),
            handle: Cudnn::new(dev.cuda_stream())?,
            plans: LruMap::new(PLAN_CAPACITY),
            workspace: None,
            last_thread: None,
            stats: CacheStats::default(),
        };
        if let Some((_, evicted)) = caches.insert(dev.id(), cache) {
            // Its convolutions may still be running in its workspace (on any thread's stream).
            evicted.ctx.synchronize().w()?;
            drop(evicted);
            ctx.bind_to_thread().w()?;
        }
    }
    let Some(cache) = caches.get(&dev.id()) else {
        candle_core::bail!("{OP}: the device's cache is missing")
    };
    let me = std::thread::current().id();
    if cache.last_thread.is_some_and(|t| t != me) {
        ctx.synchronize().w()?;
    }
    cache.last_thread = Some(me);

    let key = (<T as WithDType>::DTYPE, T::math_type() == sys::cudnnMathType_t::CUDNN_DEFAULT_MATH, shape);
    if cache.plans.contains(&key) {
        cache.stats.hits += 1;
    } else {
        cache.stats.misses += 1;
        let plan = make_plan::<T>(&cache.handle, shape)?;
        if cache.plans.insert(key, plan).is_some() {
            cache.stats.evictions += 1;
        }
    }
    let DeviceCache { plans, workspace, .. } = cache;
    let Some(plan) = plans.get(&key) else { candle_core::bail!("{OP}: the plan is missing") };
    let Some(descs) = T::descs(&plan.descs) else { candle_core::bail!("{OP}: a plan of another dtype") };
    if plan.workspace_bytes > workspace.as_ref().map_or(0, |w| w.len()) {
        // The old buffer is freed in this thread's stream order, after its convolutions.
        *workspace = None;
        let bytes = plan.workspace_bytes.div_ceil(WORKSPACE_GRANULE) * WORKSPACE_GRANULE;
        // SAFETY (of the uninitialised buffer): cuDNN's workspace is scratch it writes before
        // reading.
        #[allow(unsafe_code)]
        let buffer = unsafe { dev.alloc::<u8>(bytes) }?;
        *workspace = Some(buffer);
    }
    let conv = ConvForward { conv: &descs.conv, x: &descs.x, w: &descs.w, y: &descs.y };
    let (one, zero) = (T::from_f64(1.0), T::from_f64(0.0));
    // SAFETY: the descriptors were made for exactly these shapes (the plan's key) and dtype T, the
    // views hold the input's and weight's elements (checked in `forward`), `out` holds the
    // output's, and the workspace holds at least the bytes the algorithm asked for.
    #[allow(unsafe_code)]
    unsafe { conv.launch(plan.algo, workspace.as_mut(), (one, zero), &xv, &wv, &mut out) }?;
    Ok(out)
}

/// The descriptors and algorithm of one convolution.
fn make_plan<T: ConvType>(handle: &Arc<Cudnn>, shape: ConvShape) -> Result<Plan> {
    let int = |v: usize, what: &str| {
        std::ffi::c_int::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("{OP}: {what} = {v} exceeds cuDNN's int")))
    };
    let dims = |d: [usize; 4], what: &str| -> Result<[std::ffi::c_int; 4]> {
        Ok([int(d[0], what)?, int(d[1], what)?, int(d[2], what)?, int(d[3], what)?])
    };
    let (s, p) = (int(shape.stride, "stride")?, int(shape.padding, "padding")?);
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let mut conv = handle.create_conv2d::<f32>(
        [p, p],
        [s, s],
        [1, 1],
        sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
    )?;
    conv.set_math_type(T::math_type())?;
    let descs = Descs {
        conv,
        x: handle.create_4d_tensor::<T>(nchw, dims(shape.input, "an input dimension")?)?,
        w: handle.create_4d_filter::<T>(nchw, dims(shape.weight, "a weight dimension")?)?,
        y: handle.create_4d_tensor::<T>(nchw, dims(shape.output, "an output dimension")?)?,
    };
    let (algo, workspace_bytes) = {
        let fwd = ConvForward { conv: &descs.conv, x: &descs.x, w: &descs.w, y: &descs.y };
        choose_algorithm(&fwd)?
    };
    Ok(Plan { descs: T::wrap(descs), algo, workspace_bytes })
}

/// cuDNN's heuristic first choice, or the implicit-GEMM algorithms when it fails or asks for more
/// than [`MAX_WORKSPACE_BYTES`].
fn choose_algorithm<T: ConvType>(
    fwd: &ConvForward<'_, T, f32, T>,
) -> Result<(sys::cudnnConvolutionFwdAlgo_t, usize)> {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    let heuristic = fwd.pick_algorithm().ok();
    let fallbacks =
        [A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM];
    for algo in heuristic.into_iter().chain(fallbacks) {
        if let Ok(bytes) = fwd.get_workspace_size(algo) {
            if bytes <= MAX_WORKSPACE_BYTES {
                return Ok((algo, bytes));
            }
        }
    }
    candle_core::bail!(
        "{OP}: cuDNN offers no forward algorithm within {MAX_WORKSPACE_BYTES} bytes of workspace"
    )
}
