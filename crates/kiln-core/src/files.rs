//! File helpers shared by the loaders, the model store, tiers and the library.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temp file in the same folder, synced, then renamed
/// over `path`, so a killed run never leaves a half-written file. Errors name the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs_err::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".kiln-")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("{}: {e}", dir.display()))))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| {
        Error::Io(std::io::Error::new(e.error.kind(), format!("{}: {}", path.display(), e.error)))
    })?;
    Ok(())
}
