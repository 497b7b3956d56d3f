//! Model architectures: text encoders (CLIP, T5, Qwen3), UNet, the FLUX and Z-Image
//! transformers, VAE,
//! super-resolution nets, matting
//! (U²-Net background removal), plus the family registry ([`family`]) and the denoiser
//! interface every family's network implements ([`denoiser`]), and the multi-axis rotary
//! position embedding the transformers share ([`rope`]).

pub mod clip;
pub mod clip_tokenizer;
pub mod denoiser;
pub mod family;
pub mod flux;
pub mod matting;
pub mod qwen3;
pub mod rope;
pub mod sr;
pub mod t5;
pub mod unet;
pub mod vae;
pub mod zimage;
