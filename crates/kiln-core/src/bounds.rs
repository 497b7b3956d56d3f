//! The bounds table: every size, count and repeat a user can set has a documented range here,
//! checked before anything is allocated, so an absurd number is a clear error, never an abort
//! on a huge allocation.

use crate::error::{Error, Result};

/// One bounded setting: its name (as errors show it) and its inclusive range.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub name: &'static str,
    pub min: usize,
    pub max: usize,
    /// What the number means, for the error.
    pub unit: &'static str,
}

/// Upscale tile side, in input pixels.
pub const TILE: Bound = Bound { name: "tile", min: 16, max: 8192, unit: "px" };
/// Context around each upscale tile.
pub const HALO: Bound = Bound { name: "halo", min: 0, max: 256, unit: "px" };
/// Mirrored context past the image edges.
pub const BORDER: Bound = Bound { name: "border", min: 0, max: 256, unit: "px" };
/// Cross-fade width between RRDBNet tiles.
pub const FEATHER: Bound = Bound { name: "feather", min: 0, max: 512, unit: "px" };
/// Windows per upscaler call, and images per denoiser batch.
pub const BATCH: Bound = Bound { name: "batch", min: 1, max: 64, unit: "images" };
/// Generated image side (a preset's width or height), in pixels.
pub const GENERATE_SIDE: Bound = Bound { name: "side", min: 8, max: 16384, unit: "px" };
/// Denoising steps.
pub const STEPS: Bound = Bound { name: "steps", min: 1, max: 1000, unit: "steps" };
/// Benchmark images made untimed first.
pub const WARMUP: Bound = Bound { name: "warmup", min: 0, max: 100, unit: "images" };
/// Benchmark timed images.
pub const REPEATS: Bound = Bound { name: "repeats", min: 1, max: 100, unit: "images" };
/// Benchmark image side (diffusion tiers).
pub const BENCH_SIZE: Bound = Bound { name: "size", min: 8, max: 4096, unit: "px" };
/// Benchmark upscale input side.
pub const BENCH_UPSCALE_SIZE: Bound = Bound { name: "upscale-size", min: 8, max: 8192, unit: "px" };
/// Elements of an `.npy` array kiln reads (init latents: 4×128×128 for a 1024² image is 65 536;
/// this allows batches of 8K latents with room to spare).
pub const NPY_ELEMENTS: Bound = Bound { name: "npy elements", min: 0, max: 1 << 26, unit: "values" };

impl Bound {
    /// `value` if it lies in the range; an error naming the setting and the range otherwise.
    pub fn check(&self, value: usize) -> Result<usize> {
        if value < self.min || value > self.max {
            return Err(Error::arg(
                self.name,
                format!("{value} is outside {}..={} {}", self.min, self.max, self.unit),
            ));
        }
        Ok(value)
    }

    /// [`Bound::check`] for an optional setting.
    pub fn check_opt(&self, value: Option<usize>) -> Result<Option<usize>> {
        value.map(|v| self.check(v)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_refuse_zero_and_absurd_values_by_name() {
        assert!(HALO.check(4_294_967_295).is_err());
        assert!(TILE.check(0).is_err());
        assert!(BATCH.check(0).is_err());
        assert_eq!(STEPS.check(30).ok(), Some(30));
        let msg = BORDER.check(100_000).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("border") && msg.contains("0..=256"), "{msg}");
    }
}
