//! loaders
pub mod ncnn;
pub mod pth;
pub mod store;
