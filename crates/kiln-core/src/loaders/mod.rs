//! loaders
