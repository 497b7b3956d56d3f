//! pipeline
pub mod upscale;
