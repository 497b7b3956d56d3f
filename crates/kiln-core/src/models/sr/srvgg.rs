//! SRVGGNetCompact (Real-ESRGAN's compact VGG-style net: realesr-animevideov3, realesr-general-x4v3).
//!
//! Keys follow basicsr's `SRVGGNetCompact`: `body.{2i}` are 3x3 convolutions, `body.{2i+1}` their
//! activations (PReLU weights of shape `[num_feat]`), the last conv maps to `3 * upscale^2`
//! channels, then a pixel shuffle; the input, nearest-upsampled, is added back.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use kiln_kernels::{Act, Conv3x3};

/// Activation between convolutions (basicsr's `act_type`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SrvggAct {
    #[default]
    Prelu,
    Relu,
    /// LeakyReLU with basicsr's slope 0.1.
    Leakyrelu,
}

/// SRVGGNetCompact hyper-parameters (basicsr defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SrvggConfig {
    #[serde(default = "three")]
    pub num_in_ch: usize,
    #[serde(default = "three")]
    pub num_out_ch: usize,
    #[serde(default = "sixty_four")]
    pub num_feat: usize,
    #[serde(default = "sixteen")]
    pub num_conv: usize,
    #[serde(default = "four")]
    pub upscale: usize,
    #[serde(default)]
    pub act_type: SrvggAct,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn sixteen() -> usize {
    16
}
fn sixty_four() -> usize {
    64
}

impl Default for SrvggConfig {
    fn default() -> Self {
        Self {
            num_in_ch: 3,
            num_out_ch: 3,
            num_feat: 64,
            num_conv: 16,
            upscale: 4,
            act_type: SrvggAct::Prelu,
        }
    }
}

impl SrvggConfig {
    /// Input pixels each output pixel depends on, on each side: one per 3x3 convolution.
    pub fn receptive_radius(&self) -> usize {
        self.num_conv + 2
    }

    /// Number of weights.
    pub fn param_count(&self) -> usize {
        let conv = |cin: usize, cout: usize| cin * cout * 9 + cout;
        let prelu = if self.act_type == SrvggAct::Prelu { self.num_feat } else { 0 };
        conv(self.num_in_ch, self.num_feat)
            + self.num_conv * conv(self.num_feat, self.num_feat)
            + (self.num_conv + 1) * prelu
            + conv(self.num_feat, self.num_out_ch * self.upscale * self.upscale)
    }
}

/// SRVGGNetCompact.
pub struct SrvggNet {
    config: SrvggConfig,
    convs: Vec<(Conv3x3, Act)>,
}

impl SrvggNet {
    pub fn new(config: &SrvggConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("body");
        let mut convs = Vec::with_capacity(config.num_conv + 2);
        let mut index = 0;
        for i in 0..config.num_conv + 2 {
            let cin = if i == 0 { config.num_in_ch } else { config.num_feat };
            let last = i == config.num_conv + 1;
            let cout =
                if last { config.num_out_ch * config.upscale * config.upscale } else { config.num_feat };
            let weight = vb.pp(index).get((cout, cin, 3, 3), "weight")?;
            let bias = vb.pp(index).get(cout, "bias")?;
            let conv = Conv3x3::new(weight, bias, &[cin])?;
            index += 1;
            let act = if last {
                Act::None
            } else {
                let act = match config.act_type {
                    SrvggAct::Prelu => {
                        let w = vb.pp(index).get(config.num_feat, "weight")?;
                        Act::Prelu(w.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?)
                    }
                    SrvggAct::Relu => Act::Leaky(0.0),
                    SrvggAct::Leakyrelu => Act::Leaky(0.1),
                };
                index += 1;
                act
            };
            convs.push((conv, act));
        }
        Ok(Self { config: config.clone(), convs })
    }

    pub fn config(&self) -> &SrvggConfig {
        &self.config
    }

    /// `xs`: `[B, C, H, W]` in [0, 1]; returns `[B, C, H*s, W*s]` (unclamped).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = xs.clone();
        for (conv, act) in &self.convs {
            h = conv.forward(&h, act, None)?;
        }
        let s = self.config.upscale;
        let out = candle_nn::ops::pixel_shuffle(&h, s)?;
        let (_, _, height, width) = xs.dims4()?;
        let base = xs.upsample_nearest2d(height * s, width * s)?;
        Ok((out + base)?)
    }
}
