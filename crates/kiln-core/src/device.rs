//! Device and dtype choice. Besides `kiln-kernels`, the only module that knows about
//! cuda/metal features.

use crate::error::{Error, Result};
use candle_core::{DType, Device};

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// Best available: CUDA, then Metal, then CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl std::str::FromStr for DeviceRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::arg("--device", format!("`{s}`: expected auto, cpu, cuda, cuda:N or metal"));
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => (k, i.parse::<usize>().map_err(|_| bad())?),
            None => (s, 0),
        };
        match kind {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(index)),
            "metal" => Ok(Self::Metal(index)),
            _ => Err(bad()),
        }
    }
}

/// Whether this build can use CUDA.
pub const fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Whether this build can use Metal.
pub const fn metal_compiled() -> bool {
    cfg!(feature = "metal")
}

/// Opens the requested device. `Auto` picks CUDA, then Metal, then CPU.
pub fn open(request: DeviceRequest) -> Result<Device> {
    match request {
        DeviceRequest::Cpu => Ok(Device::Cpu),
        DeviceRequest::Cuda(i) => {
            if !cuda_compiled() {
                return Err(Error::arg(
                    "--device",
                    "this kiln was built without CUDA; rebuild with `--features cuda` (see README)",
                ));
            }
            Device::new_cuda(i).map_err(|e| Error::arg("--device", format!("cuda:{i} unavailable: {e}")))
        }
        DeviceRequest::Metal(i) => {
            if !metal_compiled() {
                return Err(Error::arg(
                    "--device",
                    "this kiln was built without Metal; rebuild with `--features metal`",
                ));
            }
            Device::new_metal(i).map_err(|e| Error::arg("--device", format!("metal:{i} unavailable: {e}")))
        }
        DeviceRequest::Auto => {
            if cuda_compiled() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if metal_compiled() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

/// A short name for the device, as recorded in metadata ("cpu", "cuda:0", "metal:0").
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Parses `--dtype`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(Error::arg("--dtype", format!("`{s}`: expected f32, f16 or bf16"))),
    }
}

/// Refuses a dtype the device cannot compute in, before any weight is loaded: candle's CPU
/// backend has no bf16 matmul, so `--dtype bf16` on the CPU would fail deep in the first layer.
pub fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    if device.is_cpu() && dtype == DType::BF16 {
        return Err(Error::arg(
            "--dtype",
            "bf16 is not supported on the CPU (candle's CPU matmul has no bf16); use f32, or bf16 on a CUDA GPU",
        ));
    }
    Ok(())
}

/// The default dtype for a device: f16 on GPUs, f32 on CPU (candle's CPU f16 is slow).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// A dtype with f32's exponent range for a decode that overflowed in f16: bf16 on CUDA (tensor
/// cores run it at f16 speed), f32 elsewhere (candle's CPU bf16 is slow; Metal's is partial).
pub fn overflow_safe_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// The device and dtype the test suites run on: `KILN_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`,
/// `metal`; default cpu) and `KILN_TEST_DTYPE` (`f32`, `f16`, `bf16`; default f32), so the same
/// parity tests run on a GPU build (see docs/gpu.md).
pub fn test_target() -> Result<(Device, DType)> {
    let read = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let request: DeviceRequest = match read(crate::env::KILN_TEST_DEVICE) {
        Some(v) => v.parse()?,
        None => DeviceRequest::Cpu,
    };
    let dtype = match read(crate::env::KILN_TEST_DTYPE) {
        Some(v) => parse_dtype(&v)?,
        None => DType::F32,
    };
    Ok((open(request)?, dtype))
}

/// The dtype's name as recorded in metadata.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        _ => "other",
    }
}

/// Peak resident memory of this process in bytes (Linux VmHWM), when the OS reports it.
pub fn peak_host_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
