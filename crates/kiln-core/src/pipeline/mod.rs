//! Pipelines: one job type per module, all standing on a [`model::LoadedModel`].
//!
//! - [`model`]: a diffusers pipeline loaded once and kept warm (CLI run, later the server);
//! - [`text`]: prompt encoding per family (SD 1.x/2.x, SDXL);
//! - [`generate`]: txt2img and img2img;
//! - [`metadata`]: what goes into output PNGs (A1111 `parameters`, kiln's replay JSON).

pub mod generate;
pub mod metadata;
pub mod model;
pub mod text;
