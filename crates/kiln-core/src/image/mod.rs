//! Image files and pixel buffers.
pub mod io;
pub mod resize;
