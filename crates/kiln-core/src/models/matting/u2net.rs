//! U²-Net (Qin et al. 2020) and its small variant U²-Net-p: salient-object segmentation used for
//! background removal (rembg's `u2net` / `u2netp`).
//!
//! Topology (the paper's and rembg's): six encoder stages of residual U-blocks (RSU-7, 6, 5, 4,
//! 4F, 4F) joined by 2×2 max-pools with ceil mode, five decoder stages (4F, 4, 5, 6, 7) fed with the
//! bilinearly upsampled deeper stage concatenated with the encoder's skip, a 3×3 side conv on each
//! decoder stage and on the deepest encoder stage, and a 1×1 conv fusing the six (upsampled) side
//! maps; the fused map through a sigmoid is the saliency mask.
//!
//! An RSU-L block: `in` conv, L−1 encoder convs (pooling between them, except in RSU-4F which uses
//! growing dilations instead), one dilated conv at the bottom, L−1 decoder convs on
//! `cat(deeper, skip)` (upsampling between them), and a residual add of the `in` conv's output.
//! Each "conv" is conv + folded batch norm + ReLU. Channel widths are not hard-coded: they are
//! read from the weights (U²-Net-p: 64/16 everywhere; U²-Net: 32..512), see [`U2NetSpec`].

use candle_core::{Module, Tensor};
use candle_nn::Conv2dConfig;
use kiln_kernels::winograd::{winograd_forward, Act, WinoInput, WinogradWeights};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};

/// The eleven stages in execution order: (RSU height, pooled?) — `false` is RSU-4F.
pub const STAGES: [(usize, bool); 11] = [
    (7, true),
    (6, true),
    (5, true),
    (4, true),
    (4, false),
    (4, false),
    (4, false),
    (4, true),
    (5, true),
    (6, true),
    (7, true),
];
/// Number of encoder stages (the rest are decoder stages).
const ENCODERS: usize = 6;

/// Channel widths of one RSU block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RsuWidths {
    pub input: usize,
    pub mid: usize,
    pub output: usize,
}

/// U²-Net hyper-parameters: the channel widths of the eleven stages and of the output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct U2NetSpec {
    pub stages: Vec<RsuWidths>,
    /// Channels of each side output and of the fused output (1 for a mask).
    pub out_ch: usize,
}

/// One conv of the net as the graph must hold it: kernel side and dilation (padding = dilation
/// for 3×3, 0 for 1×1; stride 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSlot {
    pub kernel: usize,
    pub dilation: usize,
}

/// Dilations of an RSU block's convs in execution order (`in`, encoder, bottom, decoder).
pub fn rsu_dilations(height: usize, pooled: bool) -> Vec<usize> {
    let mut d = vec![1; 2 * height];
    if pooled {
        d[height] = 2;
    } else {
        // RSU-4F: 1, 1, 2, 4, 8, 4, 2, 1.
        for (i, v) in d.iter_mut().enumerate().skip(2) {
            *v = if i <= height { 1 << (i - 1) } else { 1 << (2 * height - 1 - i) };
        }
    }
    d
}

/// Every conv of U²-Net in execution order: the eleven stages, six side convs, the fuse conv.
pub fn conv_slots() -> Vec<ConvSlot> {
    let mut slots = Vec::new();
    for &(height, pooled) in &STAGES {
        slots.extend(
            rsu_dilations(height, pooled).into_iter().map(|dilation| ConvSlot { kernel: 3, dilation }),
        );
    }
    slots.extend((0..6).map(|_| ConvSlot { kernel: 3, dilation: 1 }));
    slots.push(ConvSlot { kernel: 1, dilation: 1 });
    slots
}

/// Max-pools and resizes the graph must hold: 2×2 pools inside pooled RSU blocks and between
/// encoder stages; upsamples inside pooled blocks, between decoder stages and for side outputs.
pub fn pool_and_resize_counts() -> (usize, usize) {
    let inner: usize = STAGES.iter().filter(|s| s.1).map(|s| s.0 - 2).sum();
    (inner + ENCODERS - 1, inner + (STAGES.len() - ENCODERS) + 5)
}

impl U2NetSpec {
    /// Infers the widths from the conv weight shapes (`[out, in, k, k]`, in [`conv_slots`]
    /// order) and checks that every conv fits the topology; errors name the conv at fault.
    pub fn from_conv_shapes(shapes: &[Vec<usize>]) -> Result<Self> {
        let slots = conv_slots();
        if shapes.len() != slots.len() {
            return Err(Error::Unsupported(format!(
                "U²-Net has {} convolutions, this graph has {}",
                slots.len(),
                shapes.len()
            )));
        }
        let mut stages = Vec::new();
        let mut at = 0;
        for &(height, _) in &STAGES {
            let (first, second) = (&shapes[at], &shapes[at + 1]);
            stages.push(RsuWidths { input: first[1], mid: second[0], output: first[0] });
            at += 2 * height;
        }
        let out_ch = shapes[shapes.len() - 1][0];
        let spec = Self { stages, out_ch };
        let expected = spec.conv_shapes();
        for (i, (found, want)) in shapes.iter().zip(&expected).enumerate() {
            if found != want {
                return Err(Error::ShapeMismatch {
                    name: format!("conv #{i} weight ({})", spec.conv_role(i)),
                    expected: want.clone(),
                    found: found.clone(),
                });
            }
        }
        Ok(spec)
    }

    /// Input image channels (3).
    pub fn in_ch(&self) -> usize {
        self.stages.first().map(|s| s.input).unwrap_or(0)
    }

    /// Number of weights (convs with biases).
    pub fn param_count(&self) -> usize {
        self.conv_shapes().iter().map(|s| s.iter().product::<usize>() + s[0]).sum()
    }

    /// "u2netp" for U²-Net-p's widths, "u2net" otherwise.
    pub fn variant(&self) -> &'static str {
        if self.stages.first().map(|s| s.output) == Some(64) && self.stages.iter().all(|s| s.mid == 16) {
            "u2netp"
        } else {
            "u2net"
        }
    }

    /// Weight shapes `[out, in, k, k]` of every conv in [`conv_slots`] order.
    pub fn conv_shapes(&self) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        for (&(height, _), w) in STAGES.iter().zip(&self.stages) {
            out.push(vec![w.output, w.input, 3, 3]);
            out.push(vec![w.mid, w.output, 3, 3]);
            for _ in 1..height {
                out.push(vec![w.mid, w.mid, 3, 3]);
            }
            for _ in 1..height - 1 {
                out.push(vec![w.mid, 2 * w.mid, 3, 3]);
            }
            out.push(vec![w.output, 2 * w.mid, 3, 3]);
        }
        // Side convs read decoder stages 1..5 (stored last to first) and the deepest encoder.
        let side_src = [10, 9, 8, 7, 6, 5];
        for s in side_src {
            out.push(vec![self.out_ch, self.stages.get(s).map(|w| w.output).unwrap_or(0), 3, 3]);
        }
        out.push(vec![self.out_ch, 6 * self.out_ch, 1, 1]);
        out
    }

    /// Checks the channel chain between stages (each stage's input is what feeds it).
    pub fn validate(&self) -> Result<()> {
        let s = &self.stages;
        if s.len() != STAGES.len() || self.out_ch == 0 {
            return Err(Error::Unsupported(format!("U²-Net spec with {} stages", s.len())));
        }
        let mut feeds = vec![s[0].input];
        feeds.extend((1..ENCODERS).map(|i| s[i - 1].output));
        // Decoder stage k (index 6..11) reads cat(deeper, skip of encoder 10 - k).
        for k in ENCODERS..STAGES.len() {
            feeds.push(s[k - 1].output + s[10 - k].output);
        }
        for (i, (w, feed)) in s.iter().zip(feeds).enumerate() {
            if w.input != feed || w.mid == 0 || w.output == 0 {
                return Err(Error::Unsupported(format!(
                    "U²-Net stage {} ({}) takes {} channels but is fed {feed}",
                    i + 1,
                    stage_name(i),
                    w.input
                )));
            }
        }
        Ok(())
    }

    fn conv_role(&self, index: usize) -> String {
        let mut at = 0;
        for (i, &(height, _)) in STAGES.iter().enumerate() {
            if index < at + 2 * height {
                return format!("stage {}, conv {}", stage_name(i), index - at);
            }
            at += 2 * height;
        }
        match index - at {
            6 => "fuse conv".into(),
            k => format!("side conv {}", k + 1),
        }
    }
}

fn stage_name(i: usize) -> String {
    if i < ENCODERS {
        format!("encoder {}", i + 1)
    } else {
        format!("decoder {}", STAGES.len() - i)
    }
}

/// One conv (+ folded batch norm) with its weights, optionally followed by ReLU.
#[derive(Debug, Clone)]
enum ConvOp {
    /// kiln's CPU kernels (Winograd / banded im2col, bias fused).
    Plain(kiln_kernels::Conv2d),
    /// Dilated convs: candle's conv.
    Dilated(candle_nn::Conv2d),
}

#[derive(Debug, Clone)]
struct Conv {
    op: ConvOp,
    relu: bool,
    /// 3×3 dilation-1 convs on CPU f32: Winograd weights for the channel parts the net feeds
    /// the conv (a decoder conv's input is the concatenation of two maps, which is then never
    /// built), transformed on the first call and kept; with ReLU and the block's residual add
    /// fused into the output pass.
    winograd: Arc<OnceLock<WinogradWeights>>,
    bias_values: Option<Vec<f32>>,
    weight: Tensor,
}

impl Conv {
    fn new(weight: Tensor, bias: Tensor, slot: ConvSlot, relu: bool) -> Result<Self> {
        let padding = if slot.kernel == 1 { 0 } else { slot.dilation };
        let cfg =
            Conv2dConfig { padding, stride: 1, dilation: slot.dilation, groups: 1, cudnn_fwd_algo: None };
        let fusable = slot.kernel == 3
            && slot.dilation == 1
            && weight.device().is_cpu()
            && weight.dtype() == candle_core::DType::F32;
        let bias_values = if fusable { Some(bias.to_vec1::<f32>()?) } else { None };
        let op = if slot.dilation == 1 {
            ConvOp::Plain(kiln_kernels::Conv2d::new(weight.clone(), Some(bias), cfg)?)
        } else {
            ConvOp::Dilated(candle_nn::Conv2d::new(weight.clone(), Some(bias), cfg))
        };
        Ok(Self { op, relu, winograd: Arc::new(OnceLock::new()), bias_values, weight })
    }

    /// `act(conv(cat(parts)) + bias) + residual`, ReLU as the act when the conv has one.
    fn forward(&self, parts: &[&Tensor], residual: Option<&Tensor>) -> Result<Tensor> {
        if let Some(bias) = &self.bias_values {
            let splits = parts.iter().map(|p| p.dim(1)).collect::<candle_core::Result<Vec<_>>>()?;
            let weights = match self.winograd.get() {
                Some(w) => w,
                None => {
                    // A race only transforms twice; the first value set is kept.
                    let _ = self.winograd.set(WinogradWeights::new(&self.weight, &splits)?);
                    self.winograd
                        .get()
                        .ok_or_else(|| Error::Unsupported("Winograd weights not kept".into()))?
                }
            };
            if weights.splits() == splits {
                let inputs =
                    parts.iter().map(|p| WinoInput::new(p)).collect::<candle_core::Result<Vec<_>>>()?;
                let refs: Vec<&WinoInput> = inputs.iter().collect();
                let act = if self.relu { Act::Leaky(0.0) } else { Act::None };
                return Ok(winograd_forward(
                    weights,
                    &refs,
                    Some(bias),
                    &act,
                    1.0,
                    residual.map(|r| (r, 1.0)),
                )?);
            }
        }
        let x = match parts {
            [one] => (*one).clone(),
            _ => Tensor::cat(parts, 1)?,
        };
        let y = match &self.op {
            ConvOp::Plain(c) => c.forward(&x)?,
            ConvOp::Dilated(c) => c.forward(&x)?,
        };
        let y = if self.relu { y.relu()? } else { y };
        Ok(match residual {
            Some(r) => (y + r)?,
            None => y,
        })
    }
}

/// 2×2 max-pool, stride 2, ceil mode (an odd last row or column is a window of its own).
fn pool(x: &Tensor) -> Result<Tensor> {
    Ok(kiln_kernels::resample::max_pool2x2_ceil(x)?)
}

/// Bilinear resize of `x` to `like`'s size (PyTorch `align_corners=False`, ONNX
/// `pytorch_half_pixel`).
fn upsample_like(x: &Tensor, like: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = like.dims4()?;
    Ok(kiln_kernels::resample::upsample_bilinear(x, h, w)?)
}

/// A residual U-block.
#[derive(Debug, Clone)]
struct Rsu {
    height: usize,
    pooled: bool,
    convs: Vec<Conv>,
}

impl Rsu {
    /// The block on the channel concatenation of `parts`.
    fn forward(&self, parts: &[&Tensor]) -> Result<Tensor> {
        let l = self.height;
        let c = &self.convs;
        let hxin = c[0].forward(parts, None)?;
        let mut enc = vec![c[1].forward(&[&hxin], None)?];
        for conv in &c[2..l] {
            let last = &enc[enc.len() - 1];
            let input = if self.pooled { pool(last)? } else { last.clone() };
            enc.push(conv.forward(&[&input], None)?);
        }
        let mut d = c[l].forward(&[&enc[l - 2]], None)?;
        for j in (0..l - 1).rev() {
            // The last conv adds the block's residual (`in` conv output) in its output pass.
            let residual = if j == 0 { Some(&hxin) } else { None };
            d = c[2 * l - 1 - j].forward(&[&d, &enc[j]], residual)?;
            if j > 0 && self.pooled {
                d = upsample_like(&d, &enc[j - 1])?;
            }
        }
        Ok(d)
    }
}

/// U²-Net with its weights.
#[derive(Debug, Clone)]
pub struct U2Net {
    spec: U2NetSpec,
    stages: Vec<Rsu>,
    sides: Vec<Conv>,
    fuse: Conv,
}

impl U2Net {
    /// Builds the net from its conv weights and biases in [`conv_slots`] order (f32 or the
    /// target dtype, on the target device).
    pub fn new(spec: U2NetSpec, convs: Vec<(Tensor, Tensor)>) -> Result<Self> {
        spec.validate()?;
        let slots = conv_slots();
        if convs.len() != slots.len() {
            return Err(Error::Unsupported(format!(
                "U²-Net needs {} convolutions, got {}",
                slots.len(),
                convs.len()
            )));
        }
        let mut layers = convs.into_iter().zip(slots);
        let mut stages = Vec::new();
        for &(height, pooled) in &STAGES {
            let convs = layers
                .by_ref()
                .take(2 * height)
                .map(|((w, b), slot)| Conv::new(w, b, slot, true))
                .collect::<Result<Vec<_>>>()?;
            stages.push(Rsu { height, pooled, convs });
        }
        let mut rest =
            layers.map(|((w, b), slot)| Conv::new(w, b, slot, false)).collect::<Result<Vec<_>>>()?;
        let fuse = rest.pop().ok_or_else(|| Error::Unsupported("U²-Net without a fuse conv".into()))?;
        Ok(Self { spec, stages, sides: rest, fuse })
    }

    pub fn spec(&self) -> &U2NetSpec {
        &self.spec
    }

    /// `[B, 3, H, W]` normalised image → `[B, out_ch, H, W]` saliency in [0, 1] (the fused
    /// output, rembg's `ort_outs[0]`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let st = &self.stages;
        let mut enc = vec![st[0].forward(&[x])?];
        for stage in &st[1..ENCODERS] {
            let last = &enc[enc.len() - 1];
            enc.push(stage.forward(&[&pool(last)?])?);
        }
        // dec[0] is the deepest encoder output (stage 6), then decoder stages 5..1.
        let mut dec = vec![enc[ENCODERS - 1].clone()];
        for (k, stage) in st[ENCODERS..].iter().enumerate() {
            let skip = &enc[ENCODERS - 2 - k];
            let up = upsample_like(&dec[dec.len() - 1], skip)?;
            dec.push(stage.forward(&[&up, skip])?);
        }
        // Side k reads decoder stage k (k = 1..5) or, for k = 6, the deepest encoder stage.
        let top = &dec[dec.len() - 1];
        let mut sides = Vec::with_capacity(6);
        for (k, conv) in self.sides.iter().enumerate() {
            let src = &dec[dec.len() - 1 - k];
            let s = conv.forward(&[src], None)?;
            sides.push(if k == 0 { s } else { upsample_like(&s, top)? });
        }
        let side_refs: Vec<&Tensor> = sides.iter().collect();
        let fused = self.fuse.forward(&side_refs, None)?;
        Ok(candle_nn::ops::sigmoid(&fused)?)
    }
}
