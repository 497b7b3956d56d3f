//! models
pub mod sr;
