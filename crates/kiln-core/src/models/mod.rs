//! models
pub mod unet;
