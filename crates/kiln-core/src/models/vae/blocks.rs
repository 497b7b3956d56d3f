//! Building blocks of diffusers' VAE: ResnetBlock2D (no time embedding), Downsample2D (the
//! encoder's asymmetric-pad variant), Upsample2D (nearest ×2 + conv), and the down/up/mid blocks
//! built from them with the spatial attention of [`super::attention`]. Key names follow
//! diffusers' state dict.

use super::attention::SpatialAttention;
use crate::error::{Error, Result};
use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use kiln_kernels::{Conv2d, GroupNorm, InputNorm};

/// Epsilon of every norm in the VAE (diffusers passes `resnet_eps=1e-6` throughout).
pub(crate) const NORM_EPS: f64 = 1e-6;

/// The activations diffusers' `get_activation` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    Silu,
    Gelu,
    Relu,
    Mish,
}

impl Activation {
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "relu" => Some(Self::Relu),
            "mish" => Some(Self::Mish),
            _ => None,
        }
    }

    pub(crate) fn apply(self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => candle_nn::ops::silu(xs)?,
            // torch.nn.GELU() defaults to the exact (erf) form.
            Self::Gelu => xs.gelu_erf()?,
            Self::Relu => xs.relu()?,
            // x * tanh(softplus(x)); exp overflowing to inf still gives tanh(inf) = 1.
            Self::Mish => (xs * xs.exp()?.affine(1.0, 1.0)?.log()?.tanh()?)?,
        })
    }

    /// `act(norm(xs))`, with GroupNorm + SiLU fused where the kernel supports it.
    pub(crate) fn after_norm(self, norm: &GroupNorm, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => Ok(norm.forward_silu(xs)?),
            _ => self.apply(&norm.forward(xs)?),
        }
    }
}

/// How a forward pass applies its GroupNorms. [`PlainNorms`] normalises each tensor with its own
/// statistics (the untiled model); the tiled VAE ([`super::tiled`]) substitutes whole-image
/// statistics so every tile is normalised exactly as the full image would be.
pub(crate) trait Norms {
    /// `act(norm(xs))`, or `norm(xs)` when `act` is None.
    fn apply(&mut self, norm: &GroupNorm, act: Option<Activation>, xs: &Tensor) -> Result<Tensor>;

    /// What [`Norms::apply`] computes, as an [`InputNorm`] for the next conv to apply as it reads
    /// `xs` (so the normalised map is never written out), where the backend can: CPU f32, SiLU
    /// or no activation. None (having changed nothing) otherwise, and by default: then call
    /// `apply`.
    fn input_norm(
        &mut self,
        norm: &GroupNorm,
        act: Option<Activation>,
        xs: &Tensor,
    ) -> Result<Option<InputNorm>> {
        let _ = (norm, act, xs);
        Ok(None)
    }
}

/// Whether an activation can be fused into a conv's input read (kiln's kernels fuse SiLU).
pub(crate) fn fusable(act: Option<Activation>) -> bool {
    matches!(act, None | Some(Activation::Silu))
}

/// `conv(act(norm(xs))) [+ residual]`, with the norm read into the conv where the backend allows
/// ([`Norms::input_norm`]).
pub(crate) fn norm_conv(
    norms: &mut dyn Norms,
    (norm, act): (&GroupNorm, Option<Activation>),
    conv: &Conv2d,
    xs: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if let Some(input_norm) = norms.input_norm(norm, act, xs)? {
        return Ok(conv.forward_normed(xs, &input_norm, residual)?);
    }
    let h = norms.apply(norm, act, xs)?;
    Ok(match residual {
        Some(r) => conv.forward_add(&h, r, 1.0)?,
        None => conv.forward(&h)?,
    })
}

/// Each GroupNorm uses the statistics of the tensor it is given.
pub(crate) struct PlainNorms;

/// One stage of a network part that the tiled VAE runs tile by tile: half a resnet (each half
/// holds one of its norms), an attention, a resampler or the closing norm + conv. Stages are the
/// points where the tiled pass keeps each tile's activations, so a statistics pass resumes from
/// the last stage a tile finished instead of from the tile's input. Between stages the
/// activations are one tensor, or two inside a resnet (its first conv's output and its
/// shortcut), so that no convolution runs twice.
pub(crate) type Stage<'a> = Box<dyn Fn(&[Tensor], &mut dyn Norms) -> Result<Vec<Tensor>> + 'a>;

/// Runs `stages` in order: the untiled forward pass of what they make up.
pub(crate) fn run_stages(stages: &[Stage<'_>], xs: &Tensor, norms: &mut dyn Norms) -> Result<Tensor> {
    let mut acts = vec![xs.clone()];
    for stage in stages {
        acts = stage(&acts, norms)?;
    }
    single(&acts).cloned()
}

/// The one tensor a stage boundary outside a resnet holds.
pub(crate) fn single(acts: &[Tensor]) -> Result<&Tensor> {
    match acts {
        [xs] => Ok(xs),
        _ => Err(Error::Unsupported(format!("VAE stage: expected one activation, got {}", acts.len()))),
    }
}

/// A stage made of a one-tensor layer.
pub(crate) fn one_to_one<'a>(f: impl Fn(&Tensor, &mut dyn Norms) -> Result<Tensor> + 'a) -> Stage<'a> {
    Box::new(move |acts, norms| Ok(vec![f(single(acts)?, norms)?]))
}

impl Norms for PlainNorms {
    fn apply(&mut self, norm: &GroupNorm, act: Option<Activation>, xs: &Tensor) -> Result<Tensor> {
        match act {
            Some(act) => act.after_norm(norm, xs),
            None => Ok(norm.forward(xs)?),
        }
    }

    fn input_norm(
        &mut self,
        norm: &GroupNorm,
        act: Option<Activation>,
        xs: &Tensor,
    ) -> Result<Option<InputNorm>> {
        if !fusable(act) {
            return Ok(None);
        }
        Ok(norm.input_norm(xs, act.is_some())?)
    }
}

pub(crate) fn conv2d(
    cin: usize,
    cout: usize,
    kernel: usize,
    padding: usize,
    stride: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    Ok(kiln_kernels::conv2d(cin, cout, kernel, cfg, vb)?)
}

pub(crate) fn group_norm(groups: usize, channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    Ok(kiln_kernels::group_norm(groups, channels, NORM_EPS, vb)?)
}

/// diffusers' `ResnetBlock2D` as the VAE uses it: no time embedding, `output_scale_factor` 1.
#[derive(Debug, Clone)]
pub(crate) struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
}

impl ResnetBlock2D {
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        groups: usize,
        act: Activation,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv_shortcut =
            if cin != cout { Some(conv2d(cin, cout, 1, 0, 1, vb.pp("conv_shortcut"))?) } else { None };
        Ok(Self {
            norm1: group_norm(groups, cin, vb.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            norm2: group_norm(groups, cout, vb.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            act,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor, norms: &mut dyn Norms) -> Result<Tensor> {
        let (h, shortcut) = self.first_half(xs, norms)?;
        self.second_half(&h, &shortcut, norms)
    }

    /// norm1 → conv1, and the shortcut: what the second half needs.
    fn first_half(&self, xs: &Tensor, norms: &mut dyn Norms) -> Result<(Tensor, Tensor)> {
        let h = norm_conv(norms, (&self.norm1, Some(self.act)), &self.conv1, xs, None)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        Ok((h, shortcut))
    }

    /// norm2 → conv2 + shortcut (added in the conv's output pass).
    fn second_half(&self, h: &Tensor, shortcut: &Tensor, norms: &mut dyn Norms) -> Result<Tensor> {
        norm_conv(norms, (&self.norm2, Some(self.act)), &self.conv2, h, Some(shortcut))
    }

    /// The two halves as [`Stage`]s, appended to `out`.
    fn stages<'a>(&'a self, out: &mut Vec<Stage<'a>>) {
        out.push(Box::new(move |acts, norms| {
            let (h, shortcut) = self.first_half(single(acts)?, norms)?;
            Ok(vec![h, shortcut])
        }));
        out.push(Box::new(move |acts, norms| match acts {
            [h, shortcut] => Ok(vec![self.second_half(h, shortcut, norms)?]),
            _ => Err(Error::Unsupported(format!("VAE resnet: expected two activations, got {}", acts.len()))),
        }));
    }
}

/// diffusers' `Downsample2D(use_conv=True, padding=0, name="op")`: pad right/bottom by one, then a
/// 3×3 stride-2 conv without padding (key `downsamplers.0.conv`).
#[derive(Debug, Clone)]
pub(crate) struct Downsample2D {
    conv: Conv2d,
}

impl Downsample2D {
    pub(crate) fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 0, 2, vb.pp("conv"))? })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        // A 3×3 kernel needs at least 3 rows/columns after the one-pixel pad.
        if h < 2 || w < 2 {
            return Err(Error::arg(
                "image",
                format!("too small for the VAE encoder: a feature map of {h}x{w} cannot be downsampled"),
            ));
        }
        let xs = xs.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?;
        Ok(self.conv.forward(&xs)?)
    }
}

/// diffusers' `Upsample2D(use_conv=True)`: nearest-neighbour ×2, then a 3×3 conv.
#[derive(Debug, Clone)]
pub(crate) struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub(crate) fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { conv: conv2d(channels, channels, 3, 1, 1, vb.pp("conv"))? })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let xs = xs.upsample_nearest2d(2 * h, 2 * w)?;
        Ok(self.conv.forward(&xs)?)
    }
}

/// diffusers' `UNetMidBlock2D` with `num_layers=1`: resnet, optional attention, resnet.
#[derive(Debug, Clone)]
pub(crate) struct MidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<SpatialAttention>,
}

impl MidBlock2D {
    pub(crate) fn new(
        channels: usize,
        groups: usize,
        act: Activation,
        add_attention: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(channels, channels, groups, act, vb.pp("resnets").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let attention = if add_attention {
            Some(SpatialAttention::new(channels, channels, groups, vb.pp("attentions").pp(0))?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }

    /// diffusers' forward with the attention over windows of at most `window`² pixels
    /// ([`SpatialAttention::forward_windowed`]; `usize::MAX`: whole-map, as diffusers). Also
    /// returns the number of windows.
    /// Takes `xs` by value so that the input is released as soon as the first resnet is done
    /// with it (at a 4096² decode it is half a gigabyte).
    pub(crate) fn forward_windowed(
        &self,
        xs: Tensor,
        norms: &mut dyn Norms,
        window: usize,
    ) -> Result<(Tensor, usize)> {
        let mut xs = xs;
        let mut windows = 0;
        for (i, resnet) in self.resnets.iter().enumerate() {
            if i > 0 {
                if let Some(attention) = &self.attention {
                    (xs, windows) = attention.forward_windowed(&xs, norms, window)?;
                }
            }
            xs = resnet.forward(&xs, norms)?;
        }
        Ok((xs, windows))
    }
}

/// Resnets, each optionally followed by attention (the `Attn*` block types), as in diffusers'
/// `DownEncoderBlock2D` / `AttnDownEncoderBlock2D` / `UpDecoderBlock2D` / `AttnUpDecoderBlock2D`.
#[derive(Debug, Clone)]
struct ResnetStack {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialAttention>,
}

impl ResnetStack {
    fn new(
        layers: usize,
        cin: usize,
        cout: usize,
        groups: usize,
        act: Activation,
        with_attention: bool,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let block_in = if i == 0 { cin } else { cout };
            resnets.push(ResnetBlock2D::new(block_in, cout, groups, act, vb.pp("resnets").pp(i))?);
            if with_attention {
                attentions.push(SpatialAttention::new(cout, cout, groups, vb.pp("attentions").pp(i))?);
            }
        }
        Ok(Self { resnets, attentions })
    }

    fn stages<'a>(&'a self, out: &mut Vec<Stage<'a>>) {
        for (i, resnet) in self.resnets.iter().enumerate() {
            resnet.stages(out);
            if let Some(attention) = self.attentions.get(i) {
                out.push(one_to_one(move |xs, norms| attention.forward(xs, norms)));
            }
        }
    }
}

/// One encoder stage: resnets (+ attention), then an optional downsample.
#[derive(Debug, Clone)]
pub(crate) struct DownEncoderBlock2D {
    stack: ResnetStack,
    downsample: Option<Downsample2D>,
}

/// Shapes and options shared by the encoder and decoder block constructors.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockSpec {
    pub layers: usize,
    pub cin: usize,
    pub cout: usize,
    pub groups: usize,
    pub act: Activation,
    pub with_attention: bool,
    /// Whether the block ends with a down- (encoder) or upsampler (decoder).
    pub resample: bool,
}

impl DownEncoderBlock2D {
    pub(crate) fn new(spec: BlockSpec, vb: VarBuilder) -> Result<Self> {
        let stack = ResnetStack::new(
            spec.layers,
            spec.cin,
            spec.cout,
            spec.groups,
            spec.act,
            spec.with_attention,
            &vb,
        )?;
        let downsample = if spec.resample {
            Some(Downsample2D::new(spec.cout, vb.pp("downsamplers").pp(0))?)
        } else {
            None
        };
        Ok(Self { stack, downsample })
    }

    /// The block's [`Stage`]s, appended to `out`.
    pub(crate) fn stages<'a>(&'a self, out: &mut Vec<Stage<'a>>) {
        self.stack.stages(out);
        if let Some(down) = &self.downsample {
            out.push(one_to_one(move |xs, _| down.forward(xs)));
        }
    }
}

/// One decoder stage: resnets (+ attention), then an optional upsample.
#[derive(Debug, Clone)]
pub(crate) struct UpDecoderBlock2D {
    stack: ResnetStack,
    upsample: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    pub(crate) fn new(spec: BlockSpec, vb: VarBuilder) -> Result<Self> {
        let stack = ResnetStack::new(
            spec.layers,
            spec.cin,
            spec.cout,
            spec.groups,
            spec.act,
            spec.with_attention,
            &vb,
        )?;
        let upsample =
            if spec.resample { Some(Upsample2D::new(spec.cout, vb.pp("upsamplers").pp(0))?) } else { None };
        Ok(Self { stack, upsample })
    }

    /// The block's [`Stage`]s, appended to `out`.
    pub(crate) fn stages<'a>(&'a self, out: &mut Vec<Stage<'a>>) {
        self.stack.stages(out);
        if let Some(up) = &self.upsample {
            out.push(one_to_one(move |xs, _| up.forward(xs)));
        }
    }
}
