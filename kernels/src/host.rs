//! Layer weights held as plain f32 values on the host, owned or borrowed from a file mapping.
//!
//! candle's CPU tensors own their storage, so a weight read from a memory-mapped file is always
//! copied into the process. The CPU kernels only need a slice, so a layer can instead keep its
//! values as [`HostF32`]: a range of a read-only mapping (shared with the page cache and with
//! every other process mapping the same file) or a vector of its own. Nothing here writes to
//! the values.

use std::fmt;
use std::sync::Arc;

/// Read-only f32 values a layer computes from.
pub trait HostValues: Send + Sync {
    fn values(&self) -> &[f32];
}

impl HostValues for Vec<f32> {
    fn values(&self) -> &[f32] {
        self
    }
}

/// Shared f32 values (cloning shares them).
#[derive(Clone)]
pub struct HostF32(Arc<dyn HostValues>);

impl HostF32 {
    pub fn new(values: Arc<dyn HostValues>) -> Self {
        Self(values)
    }

    pub fn values(&self) -> &[f32] {
        self.0.values()
    }

    pub fn len(&self) -> usize {
        self.values().len()
    }

    pub fn is_empty(&self) -> bool {
        self.values().is_empty()
    }
}

impl From<Vec<f32>> for HostF32 {
    fn from(values: Vec<f32>) -> Self {
        Self(Arc::new(values))
    }
}

impl fmt::Debug for HostF32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostF32({} values)", self.len())
    }
}

/// A layer's values as its CPU kernel reads them (see `Linear::cpu_values`, `Conv2d::cpu_values`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerValues {
    pub weight: Vec<f32>,
    /// The weight's dims in the kernel's layout (`[in, out]` for a linear layer, OIHW for a conv).
    pub dims: Vec<usize>,
    pub bias: Option<Vec<f32>>,
}
