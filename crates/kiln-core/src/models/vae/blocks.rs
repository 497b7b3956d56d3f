//! Building blocks of diffusers' VAE: ResnetBlock2D (no time embedding), Downsample2D (the
//! encoder's asymmetric-pad variant), Upsample2D (nearest ×2 + conv), the single-head spatial
//! self-attention of `Attention(_from_deprecated_attn_block=True)`, and the down/up/mid blocks
//! built from them. Key names follow diffusers' state dict.

use crate::error::{Error, Result};
use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use kiln_kernels::{Conv2d, GroupNorm, Linear};

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
        let h = norms.apply(&self.norm1, Some(self.act), xs)?;
        let h = self.conv1.forward(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        Ok((h, shortcut))
    }

    /// norm2 → conv2 + shortcut (added in the conv's output pass).
    fn second_half(&self, h: &Tensor, shortcut: &Tensor, norms: &mut dyn Norms) -> Result<Tensor> {
        let h = norms.apply(&self.norm2, Some(self.act), h)?;
        Ok(self.conv2.forward_add(&h, shortcut, 1.0)?)
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

/// Most attention scores materialised at once; longer sequences are processed in query chunks so a
/// 1024² SDXL decode does not allocate a 16384² score matrix per image in one go.
const MAX_SCORES_PER_CHUNK: usize = 1 << 26;

/// Scaled dot-product attention, `softmax(q·kᵀ·scale)·v`, over `[batch, heads, tokens, head_dim]`
/// tensors. The softmax runs in f32 whatever the input dtype (diffusers declares
/// `upcast_softmax=True` for the VAE). Where kiln has a fused kernel (CPU f32; CUDA f32/f16/bf16
/// in CUDA builds) it runs that, which never materialises the score matrix; elsewhere the query
/// chunks below.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if kiln_kernels::attention_is_fused(q.device(), q.dtype(), q.dim(3)?.max(v.dim(3)?)) {
        return Ok(kiln_kernels::attention(q, k, v, scale, false)?);
    }
    chunked_attention(q, k, v, scale, MAX_SCORES_PER_CHUNK)
}

/// [`scaled_dot_product_attention`] materialising at most about `max_scores` scores at a time.
fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, max_scores: usize) -> Result<Tensor> {
    let (batch, heads, n_q, _) = q.dims4()?;
    let n_kv = k.dim(2)?;
    let dtype = q.dtype();
    let q = (q * scale)?;
    // Contiguous operands: see the note on candle's CPU matmul in `SpatialAttention::forward`.
    let k_t = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let rows = (max_scores / (batch * heads * n_kv).max(1)).clamp(1, n_q.max(1));
    let mut chunks = Vec::with_capacity(n_q.div_ceil(rows));
    let mut start = 0;
    while start < n_q {
        let len = rows.min(n_q - start);
        let q_chunk = q.narrow(2, start, len)?.contiguous()?;
        let scores = q_chunk.matmul(&k_t)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        chunks.push(probs.matmul(&v)?);
        start += len;
    }
    Ok(Tensor::cat(&chunks, 2)?)
}

/// Loads a projection of the attention block (weight, bias). Weights may be `[c, c]` (diffusers) or
/// `[c, c, 1, 1]` (1×1 convs of original LDM checkpoints converted without reshaping).
fn attention_linear(channels: usize, vb: VarBuilder) -> Result<(Tensor, Option<Tensor>)> {
    let weight = vb.get_unchecked_dtype("weight", vb.dtype())?;
    let weight = match weight.dims() {
        [o, i] if *o == channels && *i == channels => weight,
        [o, i, 1, 1] if *o == channels && *i == channels => weight.reshape((channels, channels))?,
        found => {
            return Err(Error::ShapeMismatch {
                name: format!("{}.weight", vb.prefix()),
                expected: vec![channels, channels],
                found: found.to_vec(),
            })
        }
    };
    let bias = vb.get(channels, "bias")?;
    Ok((weight, Some(bias)))
}

/// The VAE's spatial self-attention: group norm, q/k/v projections, attention, output projection,
/// residual, divided by `rescale_output_factor` (1 in the VAE). Accepts both the current key names
/// (`to_q`, `to_k`, `to_v`, `to_out.0`) and the deprecated ones (`query`, `key`, `value`,
/// `proj_attn`) that some converted folders still carry.
#[derive(Debug, Clone)]
pub(crate) struct SpatialAttention {
    group_norm: GroupNorm,
    /// to_q, to_k and to_v side by side (one gemm).
    to_qkv: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl SpatialAttention {
    /// `head_dim` is the attention head size; the VAE always passes `channels` (one head).
    pub(crate) fn new(channels: usize, head_dim: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        if head_dim == 0 || channels % head_dim != 0 {
            return Err(Error::arg(
                "attention_head_dim",
                format!("{head_dim} does not divide {channels} channels"),
            ));
        }
        let deprecated = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (q, k, v, out) = if deprecated {
            ("query", "key", "value", "proj_attn")
        } else {
            ("to_q", "to_k", "to_v", "to_out.0")
        };
        Ok(Self {
            group_norm: group_norm(groups, channels, vb.pp("group_norm"))?,
            to_qkv: Linear::concat(&[
                attention_linear(channels, vb.pp(q))?,
                attention_linear(channels, vb.pp(k))?,
                attention_linear(channels, vb.pp(v))?,
            ])?,
            to_out: {
                let (weight, bias) = attention_linear(channels, vb.pp(out))?;
                Linear::new(weight, bias)?
            },
            heads: channels / head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor, norms: &mut dyn Norms) -> Result<Tensor> {
        Ok(self.forward_windowed(xs, norms, usize::MAX)?.0)
    }

    /// [`Self::forward`], with the attention itself over overlapping windows of at most
    /// `window`² pixels once the feature map is larger than that (blended like image tiles); the
    /// norm and the projections still see the whole map. Whole-map attention is quadratic in the
    /// pixels: at a 4096² decode's 512² latent it is 140 TFLOP, more than the rest of the decode.
    /// Returns the output and the number of windows (1: whole-map attention, as diffusers).
    pub(crate) fn forward_windowed(
        &self,
        xs: &Tensor,
        norms: &mut dyn Norms,
        window: usize,
    ) -> Result<(Tensor, usize)> {
        let (b, c, h, w) = xs.dims4()?;
        // [b, hw, c], made contiguous: candle 0.11.1's CPU matmul folds the batch of a transposed lhs
        // against a broadcast rhs (what `Linear` does for 3-D inputs) into one gemm and gets it wrong.
        let tokens =
            norms.apply(&self.group_norm, None, xs)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let (attended, windows) = if h <= window && w <= window {
            (self.attend(&self.to_qkv.forward(&tokens)?, c)?, 1)
        } else {
            self.attend_windows(&tokens, (b, c, h, w), window)?
        };
        drop(tokens);
        let out = self.to_out.forward(&attended)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok(((out + xs)?, windows))
    }

    /// softmax(q·kᵀ·scale)·v over `qkv` = `[b, n, 3c]` (q, k, v side by side) → `[b, n, c]`.
    fn attend(&self, qkv: &Tensor, c: usize) -> Result<Tensor> {
        let (b, n, _) = qkv.dims3()?;
        let head_dim = c / self.heads;
        let (q, k, v) = (qkv.narrow(2, 0, c)?, qkv.narrow(2, c, c)?, qkv.narrow(2, 2 * c, c)?);
        if kiln_kernels::attention_is_fused(qkv.device(), qkv.dtype(), head_dim) {
            // Fused kernel straight on the projection's [b, n, heads * head_dim] output.
            return Ok(kiln_kernels::attention_bnc(&q, &k, &v, self.heads, self.scale, false)?);
        }
        let split_heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, n, self.heads, head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) =
            (split_heads(q.contiguous()?)?, split_heads(k.contiguous()?)?, split_heads(v.contiguous()?)?);
        let attended = scaled_dot_product_attention(&q, &k, &v, self.scale)?;
        Ok(attended.transpose(1, 2)?.reshape((b, n, c))?)
    }

    /// [`Self::attend`] over overlapping windows of the `h x w` map of normalised `tokens`
    /// (cores of at most `window`, an eighth of it as context and cross-fade), blended with the
    /// image tiler's weights. Each window projects its own q/k/v, so the whole map's (three times
    /// the activation) is never held.
    fn attend_windows(
        &self,
        tokens: &Tensor,
        (b, c, h, w): (usize, usize, usize, usize),
        window: usize,
    ) -> Result<(Tensor, usize)> {
        use crate::tiling::{StripAssembler, TileOptions, TileOutput, TilePlan};
        let margin = (window / 8).max(1);
        let options = TileOptions {
            max_tile: window,
            max_tile_rows: window,
            halo: margin,
            border: 0,
            feather: margin,
            multiple: 1,
        };
        let plan = TilePlan::new(w, h, options)?;
        let clamp =
            |r: std::ops::Range<isize>, len: usize| r.start.max(0) as usize..(r.end.max(0) as usize).min(len);
        let map = tokens.reshape((b, h, w, c))?;
        let mut images = Vec::with_capacity(b);
        for i in 0..b {
            let mut assembler = StripAssembler::new(plan.clone(), 1, c);
            let mut rows = Vec::with_capacity(h * w * c);
            for row in 0..plan.y.cores.len() {
                let ys = clamp(plan.y.window(row), h);
                for col in 0..plan.x.cores.len() {
                    let xs = clamp(plan.x.window(col), w);
                    let part =
                        map.narrow(0, i, 1)?.narrow(1, ys.start, ys.len())?.narrow(2, xs.start, xs.len())?;
                    let part = part.contiguous()?.reshape((1, ys.len() * xs.len(), c))?;
                    let attended = self.attend(&self.to_qkv.forward(&part)?, c)?;
                    // The assembler takes planar channels x rows x cols.
                    let planar = attended.reshape((ys.len() * xs.len(), c))?.t()?.to_dtype(DType::F32)?;
                    let data = planar.flatten_all()?.to_vec1::<f32>()?;
                    let origin = (ys.start as isize, xs.start as isize);
                    assembler.add(
                        row,
                        col,
                        &TileOutput { data: &data, rows: ys.len(), cols: xs.len(), origin },
                    )?;
                }
                rows.extend(assembler.finish_row(row));
            }
            images.push(Tensor::from_vec(rows, (1, h * w, c), tokens.device())?.to_dtype(tokens.dtype())?);
        }
        Ok((Tensor::cat(&images, 0)?, plan.tile_count()))
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
    pub(crate) fn forward_windowed(
        &self,
        xs: &Tensor,
        norms: &mut dyn Norms,
        window: usize,
    ) -> Result<(Tensor, usize)> {
        let mut xs = xs.clone();
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunked_attention_matches_one_pass() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 29, 8), &dev)?;
        let scale = 1.0 / 8f64.sqrt();
        // Reference: plain softmax(q kᵀ s) v in one go.
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        let expected = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        for max_scores in [1, 2 * 3 * 29 * 5, usize::MAX / 2] {
            let got = chunked_attention(&q, &k, &v, scale, max_scores)?;
            let diff = (got - &expected)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "max_scores {max_scores}: diff {diff}");
        }
        Ok(())
    }

    /// A spatial attention with random weights; `to_v` all zeros when `constant_v` (every token's
    /// value is then `to_v`'s bias, whatever it attends to).
    fn attention(c: usize, constant_v: bool) -> Result<SpatialAttention> {
        let dev = Device::Cpu;
        let mut map = std::collections::HashMap::new();
        map.insert("group_norm.weight".to_string(), Tensor::randn(1f32, 0.1, c, &dev)?);
        map.insert("group_norm.bias".to_string(), Tensor::randn(0f32, 0.1, c, &dev)?);
        for name in ["to_q", "to_k", "to_v", "to_out.0"] {
            let weight = if constant_v && name == "to_v" {
                Tensor::zeros((c, c), DType::F32, &dev)?
            } else {
                Tensor::randn(0f32, 0.5, (c, c), &dev)?
            };
            map.insert(format!("{name}.weight"), weight);
            map.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.5, c, &dev)?);
        }
        SpatialAttention::new(c, c, 2, VarBuilder::from_tensors(map, DType::F32, &dev))
    }

    #[test]
    fn windowed_attention_is_whole_map_in_one_window_and_its_weights_sum_to_one() -> Result<()> {
        let xs = Tensor::randn(0f32, 1.0, (1, 8, 12, 20), &Device::Cpu)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
        };
        let att = attention(8, false)?;
        let whole = att.forward(&xs, &mut PlainNorms)?;
        let (one, n) = att.forward_windowed(&xs, &mut PlainNorms, 20)?;
        assert_eq!((n, max_diff(&one, &whole)?), (1, 0.0));
        // Small windows attend to less than the whole map: a different result.
        let (windowed, n) = att.forward_windowed(&xs, &mut PlainNorms, 6)?;
        assert!(n > 1 && max_diff(&windowed, &whole)? > 1e-3, "{n}");
        // With one value everywhere, any window's attention gives that value: the windows'
        // blend weights must sum to one at every pixel for the result to equal the whole map's.
        let att = attention(8, true)?;
        let whole = att.forward(&xs, &mut PlainNorms)?;
        for window in [3, 5, 6, 11] {
            let (windowed, n) = att.forward_windowed(&xs, &mut PlainNorms, window)?;
            let diff = max_diff(&windowed, &whole)?;
            assert!(n > 1 && diff < 1e-4, "window {window}: {n} windows, diff {diff}");
        }
        Ok(())
    }
}
