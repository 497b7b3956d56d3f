//! Whether a VAE decode/encode runs whole or in tiles ([`crate::models::vae::TileSpec`]), as
//! requests carry it (`--vae-tiling on|off|auto`, `--vae-tile PX`).
//!
//! `auto` tiles when the untiled pass would not fit the memory budget: an estimate of the
//! untiled decoder's (or encoder's) largest live activations against the budget (given, else
//! [`DEFAULT_BUDGET`]). The default is a constant, not the machine's free memory, so the same
//! request makes the same choice — and the same pixels — on every run (replay relies on it).

use crate::error::{Error, Result};
use crate::models::vae::{AutoencoderKl, LatentDist, TileSpec, VaeConfig};
use candle_core::Tensor;

/// `--vae-tiling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VaeTilingMode {
    /// Tile when the untiled pass would not fit the memory budget.
    #[default]
    Auto,
    On,
    Off,
}

impl std::str::FromStr for VaeTilingMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(Error::arg("vae-tiling", format!("`{other}` is not one of on, off, auto"))),
        }
    }
}

/// Smallest `--vae-tile`: one latent pixel of an SD VAE is 8 output pixels; smaller tiles are
/// all halo and no core.
pub const MIN_TILE_PX: usize = 32;
/// Largest `--vae-tile` (beyond this a tile is no cheaper than an untiled 8K decode).
pub const MAX_TILE_PX: usize = 8192;

/// The tiling choice a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VaeTiling {
    pub mode: VaeTilingMode,
    /// Largest tile in output pixels; None = [`TileSpec`]'s default (512).
    pub tile_px: Option<usize>,
    /// `auto`'s memory budget in bytes; None = [`DEFAULT_BUDGET`].
    pub budget_bytes: Option<u64>,
}

/// Bytes per pixel and channel that an untiled pass holds live at its widest layer: input,
/// normalised copy, conv output and shortcut (measured ~3.5 on SD/SDXL shapes on CPU).
const LIVE_TENSORS: f64 = 3.5;

/// Estimated peak bytes of an untiled decode to `height x width` pixels (or an encode of it).
pub fn untiled_bytes(cfg: &VaeConfig, height: usize, width: usize, dtype_bytes: usize) -> u64 {
    let channels = &cfg.block_out_channels;
    let n = channels.len();
    let pixels = (height as f64) * (width as f64);
    // Stage i of the decoder runs at 1/2^(n-1-i) of the output size with channels[n-1-i]; its
    // upsampler's output already has the next resolution with the same channels.
    let widest = (0..n)
        .map(|i| {
            let ch = channels[n - 1 - i] as f64;
            let res = pixels / 4f64.powi((n - 1 - i) as i32);
            let up = if i + 1 < n { res * 4.0 } else { res };
            ch * up
        })
        .fold(0.0, f64::max);
    (widest * LIVE_TENSORS * dtype_bytes as f64) as u64
}

/// `auto` tiles above this estimate: SD/SDXL decode 1024² untiled (about 3.5 GiB in f32), larger
/// images in tiles.
pub const DEFAULT_BUDGET: u64 = 4 << 30;

impl VaeTiling {
    /// Checks the tile size (a user value) before any work.
    pub fn validate(&self) -> Result<()> {
        if let Some(px) = self.tile_px {
            if !(MIN_TILE_PX..=MAX_TILE_PX).contains(&px) {
                return Err(Error::arg(
                    "vae-tile",
                    format!("{px} px is outside {MIN_TILE_PX}..={MAX_TILE_PX}; pick e.g. 512"),
                ));
            }
        }
        Ok(())
    }

    /// The tile spec this choice gives.
    pub fn spec(&self) -> TileSpec {
        let mut spec = TileSpec::default();
        if let Some(px) = self.tile_px {
            spec.tile_px = px;
        }
        spec
    }

    /// Whether a pass over a `height x width`-pixel image tiles.
    pub fn tiles(&self, vae: &AutoencoderKl, height: usize, width: usize) -> bool {
        match self.mode {
            VaeTilingMode::On => true,
            VaeTilingMode::Off => false,
            VaeTilingMode::Auto => {
                let need = untiled_bytes(vae.config(), height, width, vae.dtype().size_in_bytes());
                need > self.budget_bytes.unwrap_or(DEFAULT_BUDGET)
            }
        }
    }

    /// Unscaled latents → image, tiled or not as chosen. A tiled decode stops with
    /// [`Error::Cancelled`] between tiles once `cancelled` says so.
    pub fn decode(
        &self,
        vae: &AutoencoderKl,
        latents: &Tensor,
        cancelled: &mut dyn FnMut() -> bool,
    ) -> Result<Tensor> {
        self.validate()?;
        let (_, _, h, w) = latents.dims4()?;
        let f = vae.scale_factor();
        if self.tiles(vae, h * f, w * f) {
            Ok(vae.decode_tiled(latents, &self.spec(), cancelled)?.0.to_dtype(vae.dtype())?)
        } else {
            vae.decode(latents)
        }
    }

    /// Image in [-1, 1] → latent distribution, tiled or not as chosen. Images whose sides are
    /// not multiples of the VAE's factor are encoded whole. A tiled encode stops with
    /// [`Error::Cancelled`] between tiles once `cancelled` says so.
    pub fn encode(
        &self,
        vae: &AutoencoderKl,
        image: &Tensor,
        cancelled: &mut dyn FnMut() -> bool,
    ) -> Result<LatentDist> {
        self.validate()?;
        let (_, _, h, w) = image.dims4()?;
        let f = vae.scale_factor();
        if h % f == 0 && w % f == 0 && self.tiles(vae, h, w) {
            Ok(vae.encode_tiled(image, &self.spec(), cancelled)?.0)
        } else {
            vae.encode(image)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_grows_with_the_image_and_matches_sdxl_scale() {
        let cfg = VaeConfig {
            block_out_channels: vec![128, 256, 512, 512],
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            ..VaeConfig::default()
        };
        let small = untiled_bytes(&cfg, 512, 512, 4);
        let big = untiled_bytes(&cfg, 1024, 1024, 4);
        assert_eq!(big, 4 * small);
        // 1024² f32: the 256-channel upsample output at full size is 1 GiB.
        assert!((3 << 30..4 << 30).contains(&big), "{big}");
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = "sideways".parse::<VaeTilingMode>().expect_err("must fail").to_string();
        assert!(err.contains("vae-tiling"), "{err}");
        let err = VaeTiling { tile_px: Some(8), ..Default::default() }
            .validate()
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("vae-tile") && err.contains("512"), "{err}");
    }
}
