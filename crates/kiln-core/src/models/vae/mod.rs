//! diffusers' `AutoencoderKL` (the SD 1.x/2.x/SDXL VAE), built from its `config.json`.
//!
//! Matches diffusers 0.42.1: `Encoder`/`Decoder` of `models/autoencoders/vae.py`, the
//! `DownEncoderBlock2D`/`UpDecoderBlock2D` (and `Attn*` variants) and `UNetMidBlock2D` blocks,
//! `ResnetBlock2D`, and the VAE's single-head spatial attention. Inputs and outputs are unscaled:
//! the pipeline applies `scaling_factor`/`shift_factor` and converts pixels.
//!
//! Modules: `attention` (the spatial self-attention, whole-map or windowed), `blocks` (resnet,
//! up/down/mid blocks, and the stages the tiled pass runs),
//! `coder` (Encoder, Decoder), `tiled` (tiled decode/encode with whole-image GroupNorm statistics:
//! [`TileSpec`]), `kept` (where a tiled pass keeps each tile's activation between its passes:
//! memory up to a budget, then scratch files).

mod attention;
mod blocks;
mod coder;
mod kept;
mod tiled;

pub use attention::scaled_dot_product_attention;
pub use kept::KeptFigures;
pub use tiled::{TileSpec, TiledRun, DEFAULT_ATTENTION_WINDOW, DEFAULT_KEEP_BYTES};

use crate::error::{Error, Result};
use blocks::Activation;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use coder::{Decoder, Encoder};
use kiln_kernels::Conv2d;
use serde::Deserialize;
use std::path::Path;

/// Runs `f` on the values of `xs` as f32, in place where it is a contiguous CPU f32 tensor (a
/// tile's activation at full size is hundreds of megabytes, a 4096² decode's latent map half a
/// gigabyte: no copy to measure, spill or attend over them).
pub(crate) fn with_f32_values<R>(xs: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let xs = xs.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = xs.storage_and_layout();
    if let candle_core::Storage::Cpu(cpu) = &*storage {
        let start = layout.start_offset();
        return Ok(f(&cpu.as_slice::<f32>()?[start..start + xs.elem_count()]));
    }
    drop(storage);
    Ok(f(&xs.flatten_all()?.to_vec1::<f32>()?))
}

/// `sample_size` of a VAE config: one number or `[height, width]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth(Vec<usize>),
}

impl Default for SampleSize {
    fn default() -> Self {
        Self::Square(32)
    }
}

/// An `AutoencoderKL` `config.json`. Absent keys take diffusers' defaults; unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: SampleSize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    /// diffusers' `AutoencoderKL.__init__` defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::default(),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Reads and checks a VAE `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs_err::read_to_string(path)?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))?;
        cfg.check().map_err(|msg| Error::config(path, msg))?;
        Ok(cfg)
    }

    /// Whether each down block carries attention (`AttnDownEncoderBlock2D`).
    fn down_attention(&self) -> std::result::Result<Vec<bool>, String> {
        self.down_block_types
            .iter()
            .map(|t| match t.strip_prefix("UNetRes").unwrap_or(t) {
                "DownEncoderBlock2D" => Ok(false),
                "AttnDownEncoderBlock2D" => Ok(true),
                other => Err(format!(
                    "down block type `{other}` is not supported (expected DownEncoderBlock2D or AttnDownEncoderBlock2D)"
                )),
            })
            .collect()
    }

    /// Whether each up block carries attention (`AttnUpDecoderBlock2D`).
    fn up_attention(&self) -> std::result::Result<Vec<bool>, String> {
        self.up_block_types
            .iter()
            .map(|t| match t.strip_prefix("UNetRes").unwrap_or(t) {
                "UpDecoderBlock2D" => Ok(false),
                "AttnUpDecoderBlock2D" => Ok(true),
                other => Err(format!(
                    "up block type `{other}` is not supported (expected UpDecoderBlock2D or AttnUpDecoderBlock2D)"
                )),
            })
            .collect()
    }

    /// Consistency checks diffusers would fail on later (or silently mis-build).
    fn check(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "{} down_block_types and {} up_block_types for {n} block_out_channels; all three must match",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        self.down_attention()?;
        self.up_attention()?;
        if Activation::parse(&self.act_fn).is_none() {
            return Err(format!(
                "act_fn `{}` is not supported (expected silu, swish, gelu, relu or mish)",
                self.act_fn
            ));
        }
        if self.norm_num_groups == 0 {
            return Err("norm_num_groups is 0".into());
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c == 0 || c % self.norm_num_groups != 0) {
            return Err(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        if self.layers_per_block == 0 {
            return Err("layers_per_block is 0".into());
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err("in_channels, out_channels and latent_channels must be positive".into());
        }
        if n > usize::BITS as usize {
            return Err(format!("{n} blocks: the spatial factor 2^{} does not fit", n - 1));
        }
        Ok(())
    }
}

/// diffusers' `DiagonalGaussianDistribution`: the encoder's posterior over latents.
#[derive(Debug, Clone)]
pub struct LatentDist {
    pub mean: Tensor,
    /// `exp(0.5 * logvar)`, with logvar clamped to [-30, 20] as diffusers does.
    pub std: Tensor,
}

impl LatentDist {
    /// `mean + std * unit_noise`; the caller draws the unit-normal noise (in diffusers' order).
    pub fn sample(&self, unit_noise: &Tensor) -> Result<Tensor> {
        if unit_noise.dims() != self.mean.dims() {
            return Err(Error::arg(
                "noise",
                format!(
                    "shape {:?} does not match the latent shape {:?}",
                    unit_noise.dims(),
                    self.mean.dims()
                ),
            ));
        }
        let noise = unit_noise.to_device(self.mean.device())?.to_dtype(self.mean.dtype())?;
        Ok(self.mean.add(&self.std.mul(&noise)?)?)
    }

    /// The distribution's mode (its mean), diffusers' `latent_dist.mode()`.
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

/// The KL autoencoder of Stable Diffusion: `encode` images to a latent distribution, `decode`
/// latents to images. Weights are `VarBuilder`'s dtype; inputs are converted to it.
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    cfg: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    device: Device,
    dtype: DType,
}

impl AutoencoderKl {
    /// Builds the model from its config and weights (diffusers' state-dict key names).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.check().map_err(|msg| Error::arg("VAE config", msg))?;
        let down_attention = cfg.down_attention().map_err(|msg| Error::arg("VAE config", msg))?;
        let up_attention = cfg.up_attention().map_err(|msg| Error::arg("VAE config", msg))?;
        let act = Activation::parse(&cfg.act_fn)
            .ok_or_else(|| Error::arg("VAE config", format!("act_fn `{}` is not supported", cfg.act_fn)))?;
        let latent = cfg.latent_channels;
        let encoder = Encoder::new(cfg, act, &down_attention, vb.pp("encoder"))?;
        let decoder = Decoder::new(cfg, act, &up_attention, vb.pp("decoder"))?;
        let quant_conv = if cfg.use_quant_conv {
            Some(blocks::conv2d(2 * latent, 2 * latent, 1, 0, 1, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(blocks::conv2d(latent, latent, 1, 0, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// Image in [-1, 1], `[B, in_channels, H, W]` → latent distribution (unscaled; the pipeline
    /// applies `scaling_factor`/`shift_factor`). Results are in the model's dtype.
    pub fn encode(&self, image: &Tensor) -> Result<LatentDist> {
        let image = self.prepare("image", image, self.cfg.in_channels)?;
        let mut moments = self.encoder.forward(&image)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        self.split_moments(&moments)
    }

    /// `quant_conv`'s output (mean and log-variance side by side) → the latent distribution.
    fn split_moments(&self, moments: &Tensor) -> Result<LatentDist> {
        let latent = self.cfg.latent_channels;
        let mean = moments.narrow(1, 0, latent)?.contiguous()?;
        let logvar = moments.narrow(1, latent, latent)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDist { mean, std })
    }

    /// Unscaled latents `[B, latent_channels, h, w]` → image `[B, out_channels, 8h, 8w]` (for a
    /// factor of 8) in about [-1, 1], in the model's dtype.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let mut latents = self.prepare("latents", latents, self.cfg.latent_channels)?;
        if let Some(conv) = &self.post_quant_conv {
            latents = conv.forward(&latents)?;
        }
        self.decoder.forward(&latents)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// `2^(len(block_out_channels) - 1)`: diffusers' `vae_scale_factor`, pixels per latent.
    pub fn scale_factor(&self) -> usize {
        1 << self.cfg.block_out_channels.len().saturating_sub(1)
    }

    pub fn latent_channels(&self) -> usize {
        self.cfg.latent_channels
    }

    /// The dtype of the weights (and of every output).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Checks an input's layout and moves it to the model's device and dtype.
    fn prepare(&self, arg: &str, xs: &Tensor, channels: usize) -> Result<Tensor> {
        match xs.dims() {
            [b, c, h, w] if *c == channels && *b > 0 && *h > 0 && *w > 0 => {}
            dims => {
                return Err(Error::arg(
                    arg,
                    format!("expected shape [batch, {channels}, height, width], got {dims:?}"),
                ))
            }
        }
        Ok(xs.to_device(&self.device)?.to_dtype(self.dtype)?)
    }
}
