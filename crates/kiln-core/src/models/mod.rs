//! Model architectures: text encoders (CLIP), UNet, VAE, super-resolution nets.

pub mod clip;
pub mod clip_tokenizer;
pub mod sr;
pub mod unet;
pub mod vae;
