//! kiln-core: the engine library behind the `kiln` CLI. No printing, no CLI parsing: every
//! function returns [`Error`] values that name what is wrong.
//!
//! Layout (by domain, as in stable-diffusion.cpp):
//! - [`schedule`]: sigma/timestep schedules, parameterisations and solvers;
//! - [`models`]: architectures only (CLIP, T5, UNet, the FLUX transformer, VAE,
//!   super-resolution nets), the family registry and the denoiser interface;
//! - [`loaders`]: diffusers folders, hub, weight files, LoRAs merged as weights load, the layout
//!   cache (pre-laid-out weights mapped in place);
//! - [`pipeline`]: one job type per module (txt2img/img2img, upscale, ...): pure compute;
//! - [`jobs`]: the job layer: specs, the engine that runs them, events, the model pool, the
//!   durable queue and API keys;
//! - [`workflow`]: the tiered draft → promote → upscale steps and replay the engine runs;
//! - [`library`]: the project, its asset library, ledger and budget;
//! - [`store`]: the database under library and queue: embedded SQLite or shared PostgreSQL,
//!   versioned migrations;
//! - [`tiers`]: the tier registry and drift guard;
//! - [`bounds`]: the range of every user-settable size, count and repeat;
//! - [`image`], [`tiling`], [`rng`], [`device`], [`host_memory`], [`bench`], [`env`], [`files`],
//!   [`error`].

pub mod bench;
pub mod bounds;
pub mod device;
pub mod env;
pub mod error;
pub mod files;
pub mod host_memory;
pub mod image;
pub mod jobs;
pub mod library;
pub mod loaders;
pub mod models;
pub mod pipeline;
pub mod rng;
pub mod schedule;
pub mod store;
pub mod tiers;
pub mod tiling;
pub mod workflow;

/// Re-exported so callers use the same candle version.
pub use candle_core as candle;
pub use error::{Error, Result};

/// kiln's version, recorded in output metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
