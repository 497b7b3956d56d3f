//! RRDBNet (ESRGAN / Real-ESRGAN x4plus, x4plus-anime-6B, x2plus).
//!
//! Keys follow basicsr's `RRDBNet`: `conv_first`, `body.{i}.rdb{1,2,3}.conv{1..5}`, `conv_body`,
//! `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`. Scales 2 and 1 take a pixel-unshuffled input
//! (4 or 16 times the channels) and always upsample 4x inside.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use kiln_kernels::{Act, Conv3x3, WinoInput};

/// RRDBNet hyper-parameters (basicsr defaults; `num_in_ch` is the image's, before unshuffle).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RrdbConfig {
    #[serde(default = "three")]
    pub num_in_ch: usize,
    #[serde(default = "three")]
    pub num_out_ch: usize,
    #[serde(default = "four")]
    pub scale: usize,
    #[serde(default = "sixty_four")]
    pub num_feat: usize,
    #[serde(default = "twenty_three")]
    pub num_block: usize,
    #[serde(default = "thirty_two")]
    pub num_grow_ch: usize,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn twenty_three() -> usize {
    23
}
fn thirty_two() -> usize {
    32
}
fn sixty_four() -> usize {
    64
}

impl Default for RrdbConfig {
    fn default() -> Self {
        Self { num_in_ch: 3, num_out_ch: 3, scale: 4, num_feat: 64, num_block: 23, num_grow_ch: 32 }
    }
}

impl RrdbConfig {
    /// Pixel-unshuffle factor applied to the input (basicsr: 2 for x2, 4 for x1).
    pub fn unshuffle(&self) -> usize {
        match self.scale {
            2 => 2,
            1 => 4,
            _ => 1,
        }
    }

    /// Channels `conv_first` sees.
    pub fn first_in_ch(&self) -> usize {
        self.num_in_ch * self.unshuffle() * self.unshuffle()
    }

    /// Number of weights.
    pub fn param_count(&self) -> usize {
        let conv = |cin: usize, cout: usize| cin * cout * 9 + cout;
        let (f, g) = (self.num_feat, self.num_grow_ch);
        let rdb = conv(f, g) + conv(f + g, g) + conv(f + 2 * g, g) + conv(f + 3 * g, g) + conv(f + 4 * g, f);
        conv(self.first_in_ch(), f) + self.num_block * 3 * rdb + 4 * conv(f, f) + conv(f, self.num_out_ch)
    }

    fn check(&self) -> Result<()> {
        if !matches!(self.scale, 1 | 2 | 4) {
            return Err(Error::Unsupported(format!(
                "RRDBNet scale {} (basicsr supports 1, 2, 4)",
                self.scale
            )));
        }
        Ok(())
    }
}

fn conv3(cin: usize, cout: usize, vb: VarBuilder, splits: &[usize]) -> Result<Conv3x3> {
    let weight = vb.get((cout, cin, 3, 3), "weight")?;
    let bias = vb.get(cout, "bias")?;
    Ok(Conv3x3::new(weight, bias, splits)?)
}

const LRELU: Act = Act::Leaky(0.2);

/// Residual dense block: five convs over the concatenation of all previous features.
struct ResidualDenseBlock {
    convs: [Conv3x3; 5],
}

impl ResidualDenseBlock {
    fn new(f: usize, g: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            convs: [
                conv3(f, g, vb.pp("conv1"), &[f])?,
                conv3(f + g, g, vb.pp("conv2"), &[f, g])?,
                conv3(f + 2 * g, g, vb.pp("conv3"), &[f, g, g])?,
                conv3(f + 3 * g, g, vb.pp("conv4"), &[f, g, g, g])?,
                conv3(f + 4 * g, f, vb.pp("conv5"), &[f, g, g, g, g])?,
            ],
        })
    }

    /// `x5 * 0.2 + x` where x5 sees the concatenation of x and all earlier outputs.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.convs[0].is_winograd() {
            // Each feature is transformed once and reused by every later conv.
            let mut parts = vec![WinoInput::new(x)?];
            for conv in &self.convs[..4] {
                let refs: Vec<&WinoInput> = parts.iter().collect();
                let y = conv.forward_parts(&refs, &LRELU, None)?;
                parts.push(WinoInput::new(&y)?);
            }
            let refs: Vec<&WinoInput> = parts.iter().collect();
            return Ok(self.convs[4].forward_parts(&refs, &Act::None, Some((x, 0.2)))?);
        }
        let mut feats = vec![x.clone()];
        for conv in &self.convs[..4] {
            feats.push(conv.forward_generic(&feats, &LRELU, None)?);
        }
        Ok(self.convs[4].forward_generic(&feats, &Act::None, Some((x, 0.2)))?)
    }
}

struct Rrdb {
    rdbs: [ResidualDenseBlock; 3],
}

impl Rrdb {
    fn new(f: usize, g: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            rdbs: [
                ResidualDenseBlock::new(f, g, vb.pp("rdb1"))?,
                ResidualDenseBlock::new(f, g, vb.pp("rdb2"))?,
                ResidualDenseBlock::new(f, g, vb.pp("rdb3"))?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for rdb in &self.rdbs {
            h = rdb.forward(&h)?;
        }
        Ok(((h * 0.2)? + x)?)
    }
}

/// RRDBNet.
pub struct RrdbNet {
    config: RrdbConfig,
    conv_first: Conv3x3,
    body: Vec<Rrdb>,
    conv_body: Conv3x3,
    conv_up1: Conv3x3,
    conv_up2: Conv3x3,
    conv_hr: Conv3x3,
    conv_last: Conv3x3,
}

impl RrdbNet {
    pub fn new(config: &RrdbConfig, vb: VarBuilder) -> Result<Self> {
        config.check()?;
        let (f, g) = (config.num_feat, config.num_grow_ch);
        let body = (0..config.num_block)
            .map(|i| Rrdb::new(f, g, vb.pp("body").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: config.clone(),
            conv_first: conv3(config.first_in_ch(), f, vb.pp("conv_first"), &[config.first_in_ch()])?,
            body,
            conv_body: conv3(f, f, vb.pp("conv_body"), &[f])?,
            conv_up1: conv3(f, f, vb.pp("conv_up1"), &[f])?,
            conv_up2: conv3(f, f, vb.pp("conv_up2"), &[f])?,
            conv_hr: conv3(f, f, vb.pp("conv_hr"), &[f])?,
            conv_last: conv3(f, config.num_out_ch, vb.pp("conv_last"), &[f])?,
        })
    }

    pub fn config(&self) -> &RrdbConfig {
        &self.config
    }

    /// `xs`: `[B, C, H, W]` in [0, 1] (H, W multiples of the unshuffle factor);
    /// returns `[B, C, H*scale, W*scale]` (unclamped).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let u = self.config.unshuffle();
        let (_, _, height, width) = xs.dims4()?;
        if height % u != 0 || width % u != 0 {
            return Err(Error::arg(
                "tile",
                format!("RRDBNet x{} needs sides divisible by {u}, got {width}x{height}", self.config.scale),
            ));
        }
        let feat_in = if u > 1 { candle_nn::ops::pixel_unshuffle(xs, u)? } else { xs.clone() };
        let feat = self.conv_first.forward(&feat_in, &Act::None, None)?;
        let mut h = feat.clone();
        for block in &self.body {
            h = block.forward(&h)?;
        }
        let feat = self.conv_body.forward(&h, &Act::None, Some((&feat, 1.0)))?;
        let up = |x: &Tensor, conv: &Conv3x3| -> Result<Tensor> {
            let (_, _, hh, ww) = x.dims4()?;
            Ok(conv.forward(&x.upsample_nearest2d(hh * 2, ww * 2)?, &LRELU, None)?)
        };
        let feat = up(&feat, &self.conv_up1)?;
        // The 4x tail (upsample, conv_up2, conv_hr, conv_last) holds the largest activations:
        // run it in bands of rows with 2 rows of context (4 at 4x covers its 3 convs), so
        // memory stays a small multiple of the 2x feature map. Zero padding at the window's
        // real top/bottom is unchanged, so the result equals the unbanded one.
        let (_, _, h2, _) = feat.dims4()?;
        const BAND: usize = 32;
        let mut bands = Vec::with_capacity(h2.div_ceil(BAND));
        for b0 in (0..h2).step_by(BAND) {
            let b1 = (b0 + BAND).min(h2);
            let (lo, hi) = (b0.saturating_sub(2), (b1 + 2).min(h2));
            let y = up(&feat.narrow(2, lo, hi - lo)?, &self.conv_up2)?;
            let y = self.conv_hr.forward(&y, &LRELU, None)?;
            let y = self.conv_last.forward(&y, &Act::None, None)?;
            bands.push(y.narrow(2, 2 * (b0 - lo), 2 * (b1 - b0))?);
        }
        Ok(Tensor::cat(&bands, 2)?)
    }
}
