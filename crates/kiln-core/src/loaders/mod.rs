//! Loaders: where weights and configs come from (diffusers folders, the Hugging Face hub cache,
//! safetensors files, ONNX graphs for matting models). Architectures live in `models`; this module only finds and opens files.

pub mod diffusers;
pub mod hub;
pub mod matting;
pub mod ncnn;
pub mod onnx;
pub mod pth;
pub mod store;
pub mod weights;
