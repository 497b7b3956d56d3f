//! Model architectures: text encoders (CLIP), UNet, VAE, super-resolution nets, matting
//! (U²-Net background removal).

pub mod clip;
pub mod clip_tokenizer;
pub mod matting;
pub mod sr;
pub mod unet;
pub mod vae;
