//! Super-resolution networks: RRDBNet and SRVGGNetCompact, plus their description ([`SrSpec`])
//! inferred from a state dict's key names and shapes (weight files carry no config).

pub mod rrdbnet;
pub mod srvgg;

use std::collections::HashMap;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use rrdbnet::{RrdbConfig, RrdbNet};
pub use srvgg::{SrvggAct, SrvggConfig, SrvggNet};

/// Which network, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SrArch {
    Rrdbnet(RrdbConfig),
    Srvgg(SrvggConfig),
}

/// A super-resolution model: network plus an optional bicubic resample of its output
/// (realesr-animevideov3 x2/x3 in ncnn form are the x4 net followed by a 0.5/0.75 resize).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SrSpec {
    pub arch: SrArch,
    /// Final integer scale when it differs from the net's own (bicubic down-resample after it).
    #[serde(default)]
    pub output_scale: Option<usize>,
}

impl SrSpec {
    /// The network's own upscale factor.
    pub fn net_scale(&self) -> usize {
        match &self.arch {
            SrArch::Rrdbnet(c) => c.scale,
            SrArch::Srvgg(c) => c.upscale,
        }
    }

    /// The model's scale after any output resample.
    pub fn scale(&self) -> usize {
        self.output_scale.unwrap_or_else(|| self.net_scale())
    }

    /// Architecture name as basicsr spells it.
    pub fn arch_name(&self) -> &'static str {
        match &self.arch {
            SrArch::Rrdbnet(_) => "RRDBNet",
            SrArch::Srvgg(_) => "SRVGGNetCompact",
        }
    }

    pub fn param_count(&self) -> usize {
        match &self.arch {
            SrArch::Rrdbnet(c) => c.param_count(),
            SrArch::Srvgg(c) => c.param_count(),
        }
    }

    /// Input channels the net takes (3 for all released models).
    pub fn in_channels(&self) -> usize {
        match &self.arch {
            SrArch::Rrdbnet(c) => c.num_in_ch,
            SrArch::Srvgg(c) => c.num_in_ch,
        }
    }

    /// Exact receptive radius in input pixels, when small enough to tile exactly (SRVGG);
    /// includes the output resample's taps.
    pub fn receptive_radius(&self) -> Option<usize> {
        match &self.arch {
            SrArch::Rrdbnet(_) => None,
            SrArch::Srvgg(c) => Some(c.receptive_radius() + usize::from(self.output_scale.is_some()) * 2),
        }
    }

    /// Tile sides must be multiples of this (pixel-unshuffle input).
    pub fn input_multiple(&self) -> usize {
        match &self.arch {
            SrArch::Rrdbnet(c) => c.unshuffle(),
            SrArch::Srvgg(_) => 1,
        }
    }

    /// Checks internal consistency (used on specs read from disk).
    pub fn validate(&self) -> Result<()> {
        let net = self.net_scale();
        if net == 0 || net > 16 {
            return Err(Error::Unsupported(format!("super-resolution net scale {net}")));
        }
        if let Some(s) = self.output_scale {
            if s == 0 || s >= net {
                return Err(Error::Unsupported(format!(
                    "output scale {s} with a x{net} net (only down-resampling)"
                )));
            }
        }
        Ok(())
    }

    /// Infers the architecture from official (basicsr) key names and shapes.
    pub fn detect(shapes: &HashMap<String, Vec<usize>>, origin: &std::path::Path) -> Result<Self> {
        let bad = |msg: String| Error::Weights { path: origin.to_path_buf(), msg };
        let dims = |k: &str| shapes.get(k).map(|v| v.as_slice());
        let conv = |k: &str| -> Result<(usize, usize)> {
            match dims(&format!("{k}.weight")) {
                Some(&[o, i, 3, 3]) => Ok((o, i)),
                Some(other) => {
                    Err(bad(format!("`{k}.weight` has shape {other:?}, expected [out, in, 3, 3]")))
                }
                None => Err(bad(format!("`{k}.weight` missing"))),
            }
        };
        if shapes.contains_key("conv_first.weight") {
            let (num_feat, first_in) = conv("conv_first")?;
            let (num_out_ch, _) = conv("conv_last")?;
            let (num_grow_ch, _) = conv("body.0.rdb1.conv1")?;
            let num_block =
                (0..).take_while(|i| shapes.contains_key(&format!("body.{i}.rdb1.conv1.weight"))).count();
            if shapes.contains_key("conv_up3.weight") {
                return Err(Error::Unsupported("RRDBNet with conv_up3 (x8 ESRGAN variants)".into()));
            }
            let num_in_ch = num_out_ch;
            let scale = match first_in / num_in_ch.max(1) {
                1 => 4,
                4 => 2,
                16 => 1,
                _ => {
                    return Err(bad(format!(
                        "conv_first takes {first_in} channels, not 1/4/16 x {num_in_ch}"
                    )))
                }
            };
            let spec = Self {
                arch: SrArch::Rrdbnet(RrdbConfig {
                    num_in_ch,
                    num_out_ch,
                    scale,
                    num_feat,
                    num_block,
                    num_grow_ch,
                }),
                output_scale: None,
            };
            return Ok(spec);
        }
        if shapes.contains_key("body.0.weight") {
            let (num_feat, num_in_ch) = conv("body.0")?;
            let mut conv_indices = Vec::new();
            let mut i = 0;
            while let Some(d) = dims(&format!("body.{i}.weight")) {
                if d.len() == 4 {
                    conv_indices.push(i);
                }
                i += 1;
            }
            let Some(&last) = conv_indices.last() else {
                return Err(bad("SRVGG body has no convolutions".into()));
            };
            if conv_indices.len() < 2 {
                return Err(bad("SRVGG body needs at least two convolutions".into()));
            }
            let (last_out, _) = conv(&format!("body.{last}"))?;
            let num_out_ch = num_in_ch;
            let upscale = (1..=8).find(|s| num_out_ch * s * s == last_out).ok_or_else(|| {
                bad(format!("last conv has {last_out} outputs, not {num_out_ch} x scale^2"))
            })?;
            let act_type =
                if shapes.contains_key("body.1.weight") { SrvggAct::Prelu } else { SrvggAct::Relu };
            let config = SrvggConfig {
                num_in_ch,
                num_out_ch,
                num_feat,
                num_conv: conv_indices.len() - 2,
                upscale,
                act_type,
            };
            return Ok(Self { arch: SrArch::Srvgg(config), output_scale: None });
        }
        Err(bad("not a known super-resolution state dict (no `conv_first.weight` or `body.0.weight`)".into()))
    }
}

/// A built super-resolution net.
pub enum SrNet {
    Rrdb(Box<RrdbNet>),
    Srvgg(SrvggNet),
}

impl SrNet {
    pub fn new(spec: &SrSpec, vb: VarBuilder) -> Result<Self> {
        spec.validate()?;
        Ok(match &spec.arch {
            SrArch::Rrdbnet(c) => SrNet::Rrdb(Box::new(RrdbNet::new(c, vb)?)),
            SrArch::Srvgg(c) => SrNet::Srvgg(SrvggNet::new(c, vb)?),
        })
    }

    /// Runs the net (without any output resample): `[B, C, H, W]` -> `[B, C, H*s, W*s]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            SrNet::Rrdb(n) => n.forward(xs),
            SrNet::Srvgg(n) => n.forward(xs),
        }
    }
}
