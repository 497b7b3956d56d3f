//! Matting / background-removal nets: an image in, a foreground mask out.
//!
//! - [`u2net`]: U²-Net and U²-Net-p (rembg's `u2net`, `u2netp`).
//!
//! [`MattingSpec`] names the architecture and everything its pre-processing needs, so another
//! family (ISNet/DIS, BiRefNet) is one more variant here plus its importer, behind the same
//! `kiln cutout` and model store.

pub mod u2net;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::Result;
pub use u2net::{U2Net, U2NetSpec};

/// Architecture and hyper-parameters of an imported matting model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum MattingSpec {
    U2net(U2NetSpec),
}

/// How an image becomes the net's input: a fixed square size, scaled by the resized image's
/// maximum value, then normalised per channel (rembg's `normalize`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    pub size: u32,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

/// ImageNet statistics, as rembg passes them for U²-Net.
pub const IMAGENET: Preprocess =
    Preprocess { size: 320, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };

impl MattingSpec {
    /// "u2netp", "u2net", ...
    pub fn arch_name(&self) -> &'static str {
        match self {
            MattingSpec::U2net(s) => s.variant(),
        }
    }

    pub fn param_count(&self) -> usize {
        match self {
            MattingSpec::U2net(s) => s.param_count(),
        }
    }

    pub fn preprocess(&self) -> Preprocess {
        match self {
            MattingSpec::U2net(_) => IMAGENET,
        }
    }
}

/// A matting net with its weights on a device.
#[derive(Debug, Clone)]
pub enum MattingNet {
    U2net(U2Net),
}

impl MattingNet {
    /// Builds the net from conv weights/biases in the architecture's order.
    pub fn new(spec: &MattingSpec, convs: &[(Tensor, Tensor)], device: &Device) -> Result<Self> {
        let on_device = convs
            .iter()
            .map(|(w, b)| Ok((w.to_device(device)?, b.to_device(device)?)))
            .collect::<Result<Vec<_>>>()?;
        match spec {
            MattingSpec::U2net(s) => Ok(MattingNet::U2net(U2Net::new(s.clone(), on_device)?)),
        }
    }

    /// `[1, 3, S, S]` normalised input → `[1, 1, S, S]` foreground probability.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            MattingNet::U2net(n) => n.forward(x),
        }
    }
}
