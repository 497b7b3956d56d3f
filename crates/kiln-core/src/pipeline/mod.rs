//! Pipelines: one job type per module, all standing on a [`model::LoadedModel`].
//!
//! - [`model`]: a diffusers pipeline loaded once and kept warm (CLI run, later the server);
//! - [`text`]: prompt encoding per family (SD 1.x/2.x, SDXL, FLUX);
//! - [`text_encoders`]: the text stacks a job may release after encoding and reload;
//! - [`generate`]: txt2img and img2img for every family;
//! - [`inpaint`]: inpainting (any model, or dedicated 9-channel ones);
//! - [`outpaint`]: canvas extension and its mask, run through [`inpaint`];
//! - [`cutout`]: background removal with a matting model (rembg's mask, refinement, compositing);
//! - [`cutout_replace`]: background replacement (inverted cutout mask, feathered, inpainted);
//! - [`upscale`]: tiled super-resolution, streamed to the PNG encoder;
//! - [`redetail`]: diffusion re-detail of a large image on blended latent tiles (MultiDiffusion);
//! - [`metadata`]: what goes into output PNGs (A1111 `parameters`, kiln's replay JSON);
//! - [`vae_tiling`]: untiled vs tiled VAE decode/encode (`--vae-tiling`, `--vae-tile`).

pub mod cutout;
pub mod cutout_replace;
pub mod generate;
pub mod inpaint;
pub mod metadata;
pub mod model;
pub mod outpaint;
pub mod redetail;
pub mod text;
pub mod text_encoders;
pub mod upscale;
pub mod vae_tiling;
