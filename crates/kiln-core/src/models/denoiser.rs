//! The denoiser interface: every family's denoising network (the SD UNet, the FLUX transformer)
//! behind one trait, so the sampling loops (txt2img, img2img, inpaint) never ask which network
//! they drive.
//!
//! Latents always travel in the VAE's layout `[B, C, h, w]`; a transformer that works on
//! patches packs and unpacks them itself, so masks, previews and the solvers stay
//! family-neutral (FLUX's Euler step is element-wise, so stepping unpacked latents is the same
//! maths as diffusers' stepping of packed ones).

use crate::error::{Error, Result};
use crate::models::unet::{UNet2DConditionModel, UNetCond};
use candle_core::{DType, Device, Tensor};
use std::any::Any;

/// Family-neutral conditioning of one denoiser call, for a batch of `B` rows (CFG: negatives first).
#[derive(Debug, Clone, Copy)]
pub struct DenoiserCond<'a> {
    /// The text token sequence, `[B, tokens, dim]` (CLIP hidden states, T5 hidden states).
    pub tokens: &'a Tensor,
    /// A pooled text vector, `[B, dim]` (SDXL's text_embeds, FLUX's CLIP pooled projection).
    pub pooled: Option<&'a Tensor>,
    /// SDXL micro-conditioning: `[B, 6]` (original h, w, crop top, left, target h, w).
    pub time_ids: Option<&'a Tensor>,
    /// The guidance the network embeds itself ([`Denoiser::guidance_input`]): LCM's
    /// `[B, time_cond_proj_dim]` w-embedding, FLUX.1-dev's `[B]` distilled guidance.
    pub guidance: Option<&'a Tensor>,
    /// Real tokens per row when rows' sequences differ in length (zero-padded past them), for
    /// networks that must not see padding (Z-Image); None when every token of every row is real.
    pub token_lens: Option<&'a [usize]>,
}

/// A denoising network: latents, the scheduler's timestep and conditioning → its prediction
/// (noise, v or flow velocity, as the scheduler expects), in the latents' layout.
pub trait Denoiser: Send + Sync {
    /// Predicts for `latents` `[B, in_channels, h, w]` at `timestep` (the scheduler's value,
    /// the same for the whole batch). The output has the latent channels and `h`×`w`.
    fn predict(&self, latents: &Tensor, timestep: f64, cond: &DenoiserCond) -> Result<Tensor>;

    /// Channels of the latents the network takes (a 9-channel inpainting UNet takes the mask
    /// and masked-image latents beside the 4 latent channels).
    fn in_channels(&self) -> usize;

    /// Latent pixels per side of one token: 1 for a UNet, 2 for FLUX's 2×2 packing. Latent
    /// sizes must be multiples of it.
    fn patch_size(&self) -> usize {
        1
    }

    /// The guidance tensor the network embeds itself for a batch of `b` at guidance scale `g`,
    /// or None when it has no guidance embedding (then guidance means classifier-free guidance,
    /// or nothing).
    fn guidance_input(&self, _g: f64, _b: usize, _device: &Device) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether the network embeds the guidance value itself ([`Denoiser::guidance_input`]
    /// returns a tensor), so that no classifier-free guidance pass is run.
    fn embeds_guidance(&self) -> bool {
        false
    }

    /// diffusers' default latent size `(h, w)` from the network config, when it records one.
    fn default_latent_size(&self) -> Option<(usize, usize)> {
        None
    }

    fn dtype(&self) -> DType;

    /// For callers that need the concrete network (tests, benchmarks).
    fn as_any(&self) -> &dyn Any;
}

impl Denoiser for UNet2DConditionModel {
    fn predict(&self, latents: &Tensor, timestep: f64, cond: &DenoiserCond) -> Result<Tensor> {
        let unet_cond = UNetCond {
            encoder_hidden_states: cond.tokens,
            text_embeds: cond.pooled,
            time_ids: cond.time_ids,
            timestep_cond: cond.guidance,
        };
        self.forward(latents, timestep, &unet_cond)
    }

    fn in_channels(&self) -> usize {
        self.config().in_channels
    }

    fn embeds_guidance(&self) -> bool {
        self.config().time_cond_proj_dim.is_some()
    }

    /// LCM-distilled UNets (`time_cond_proj_dim`) embed `w = g - 1` as diffusers'
    /// `get_guidance_scale_embedding`.
    fn guidance_input(&self, g: f64, b: usize, device: &Device) -> Result<Option<Tensor>> {
        match self.config().time_cond_proj_dim {
            Some(dim) => Ok(Some(w_embedding(g - 1.0, dim, b, device)?.to_dtype(self.dtype())?)),
            None => Ok(None),
        }
    }

    fn default_latent_size(&self) -> Option<(usize, usize)> {
        let as_usize = |v: &serde_json::Value| v.as_u64().map(|n| n as usize);
        match &self.config().sample_size {
            Some(serde_json::Value::Array(hw)) if hw.len() == 2 => {
                Some((as_usize(&hw[0])?, as_usize(&hw[1])?))
            }
            Some(v) => as_usize(v).map(|n| (n, n)),
            None => None,
        }
    }

    fn dtype(&self) -> DType {
        UNet2DConditionModel::dtype(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// diffusers' get_guidance_scale_embedding (for UNets with time_cond_proj_dim).
fn w_embedding(w: f64, dim: usize, b: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let scale = (10000f64).ln() / (half.max(2) - 1) as f64;
    let w = w * 1000.0;
    let mut row: Vec<f32> = Vec::with_capacity(dim);
    let freqs: Vec<f64> = (0..half).map(|k| (-(k as f64) * scale).exp() * w).collect();
    row.extend(freqs.iter().map(|x| x.sin() as f32));
    row.extend(freqs.iter().map(|x| x.cos() as f32));
    row.resize(dim, 0.0);
    let data: Vec<f32> = row.iter().copied().cycle().take(dim * b).collect();
    Ok(Tensor::from_vec(data, (b, dim), device)?)
}

/// Packs `[B, C, h, w]` latents into `[B, (h/2)(w/2), 4C]` tokens (diffusers' `_pack_latents`).
pub fn pack_2x2(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        return Err(Error::arg("latents", format!("{h}x{w} latents cannot be packed in 2x2 patches")));
    }
    Ok(latents.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((
        b,
        (h / 2) * (w / 2),
        c * 4,
    ))?)
}

/// The inverse of [`pack_2x2`] for an `h`×`w` latent (diffusers' `_unpack_latents`).
pub fn unpack_2x2(tokens: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, d) = tokens.dims3()?;
    let c = d / 4;
    Ok(tokens.reshape((b, h / 2, w / 2, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_follows_diffusers_layout_and_round_trips() -> Result<()> {
        let (c, h, w) = (3, 4, 6);
        let x = Tensor::arange(0f32, (c * h * w) as f32, &Device::Cpu)?.reshape((1, c, h, w))?;
        let packed = pack_2x2(&x)?;
        assert_eq!(packed.dims(), &[1, (h / 2) * (w / 2), 4 * c]);
        // diffusers: token (i, j) holds x[ch, 2i + dy, 2j + dx] at feature ch * 4 + dy * 2 + dx.
        let p = packed.squeeze(0)?.to_vec2::<f32>()?;
        let v = x.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..h / 2 {
            for j in 0..w / 2 {
                for ch in 0..c {
                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let want = v[ch * h * w + (2 * i + dy) * w + 2 * j + dx];
                        assert_eq!(p[i * (w / 2) + j][ch * 4 + dy * 2 + dx], want);
                    }
                }
            }
        }
        let back = unpack_2x2(&packed, h, w)?;
        assert_eq!(back.flatten_all()?.to_vec1::<f32>()?, v);
        assert!(pack_2x2(&Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu)?).is_err());
        Ok(())
    }
}
