//! File helpers shared by the loaders, the model store, tiers and the library.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A JSON file's contents, or the default when the file does not exist yet (the model stores'
/// indexes); unparsable JSON is an error naming the file.
pub fn read_json_or_default<T: Default + serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    if !path.exists() {
        return Ok(T::default());
    }
    let text = fs_err::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, e.to_string()))
}

/// Most entries one folder walk visits: a hostile or mistaken tree (the root of a disk) is
/// refused rather than walked for hours.
pub const MAX_WALK_ENTRIES: usize = 100_000;

/// Every file under `dir`, sorted, each once. Symbolic links are followed, but a folder reached
/// twice (a link loop, or two links to one folder) is walked once and a file reached through
/// two names is listed once, so an import never sees one model forty times.
pub fn walk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut seen_dirs = std::collections::HashSet::new();
    let mut seen_files = std::collections::HashSet::new();
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut visited = 0usize;
    while let Some(d) = stack.pop() {
        if !seen_dirs.insert(fs_err::canonicalize(&d)?) {
            continue;
        }
        for entry in fs_err::read_dir(&d)? {
            visited += 1;
            if visited > MAX_WALK_ENTRIES {
                return Err(Error::arg(
                    "folder",
                    format!(
                        "{} holds more than {MAX_WALK_ENTRIES} entries; pass the folder that holds the models",
                        dir.display()
                    ),
                ));
            }
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                // A dangling link or a socket is not a model; a file seen under another name is skipped.
                if seen_files.insert(fs_err::canonicalize(&p)?) {
                    files.push(p);
                }
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The one output-path guard: kiln replaces only regular files (or writes new names). A
/// device, a folder, a socket or a symlink at the target is refused, so an atomic rename can
/// never replace `/dev/null` or follow a link somewhere else.
pub fn guard_target(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => Err(Error::arg(
            "out",
            format!(
                "{} exists and is not a regular file; kiln only writes new files or replaces regular ones",
                path.display()
            ),
        )),
        _ => Ok(()),
    }
}

/// A temp file beside `path` for an atomic write, created with mode 0666 less the umask (as
/// any new file), not tempfile's private 0600, so teammates can read what kiln writes.
pub fn temp_beside(path: &Path, suffix: &str) -> Result<tempfile::NamedTempFile> {
    guard_target(path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs_err::create_dir_all(dir)?;
    // Named after its target, so the temp file of a killed queue run (`q<id>a<attempt>-…`) is
    // recognised as that run's and removed with its other files.
    let prefix = format!(".kiln-{}-", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(suffix);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
        .tempfile_in(dir)
        .map_err(|e| Error::Io(std::io::Error::new(e.kind(), format!("{}: {e}", dir.display()))))
}

/// Syncs a finished temp file, checks it holds exactly `expected` bytes (a full disk can
/// truncate a file without any write reporting it), and renames it over `path`.
pub fn commit_temp(tmp: tempfile::NamedTempFile, path: &Path, expected: u64) -> Result<()> {
    tmp.as_file().sync_all()?;
    let len = tmp.as_file().metadata()?.len();
    if len != expected {
        return Err(Error::Io(std::io::Error::other(format!(
            "{}: wrote {len} of {expected} bytes (disk full?); nothing was replaced",
            path.display()
        ))));
    }
    guard_target(path)?;
    tmp.persist(path).map_err(|e| {
        Error::Io(std::io::Error::new(e.error.kind(), format!("{}: {}", path.display(), e.error)))
    })?;
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, written, flushed,
/// synced and its length checked, then renamed over `path`, so a killed run or a full disk
/// never leaves a half-written file at `path`. Errors name the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = temp_beside(path, ".part")?;
    tmp.write_all(bytes)?;
    tmp.flush()?;
    commit_temp(tmp, path, bytes.len() as u64)
}

/// A writer that counts what it passes on and keeps the first error, including the one a
/// buffered writer only meets when it is flushed on drop (which `Drop` would swallow).
pub struct CheckedWriter {
    inner: Option<std::io::BufWriter<std::fs::File>>,
    state: std::sync::Arc<std::sync::Mutex<(u64, Option<String>)>>,
}

/// What a [`CheckedWriter`] wrote: (bytes, first error).
pub type WriteOutcome = std::sync::Arc<std::sync::Mutex<(u64, Option<String>)>>;

impl CheckedWriter {
    pub fn new(file: std::fs::File) -> (Self, WriteOutcome) {
        let state = WriteOutcome::default();
        (Self { inner: Some(std::io::BufWriter::with_capacity(1 << 20, file)), state: state.clone() }, state)
    }

    fn record(&self, n: u64, err: Option<&std::io::Error>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += n;
        if let (Some(e), None) = (err, &s.1) {
            s.1 = Some(e.to_string());
        }
    }
}

impl Write for CheckedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(w) = self.inner.as_mut() else { return Err(std::io::Error::other("writer closed")) };
        match w.write(buf) {
            Ok(n) => {
                self.record(n as u64, None);
                Ok(n)
            }
            Err(e) => {
                self.record(0, Some(&e));
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let Some(w) = self.inner.as_mut() else { return Ok(()) };
        w.flush().inspect_err(|e| self.record(0, Some(e)))
    }
}

impl Drop for CheckedWriter {
    fn drop(&mut self) {
        if let Some(mut w) = self.inner.take() {
            if let Err(e) = w.flush() {
                self.record(0, Some(&e));
            }
        }
    }
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir` (`None` when unknown).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn free_disk_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    #[allow(unsafe_code)]
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer statvfs fills on success only.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Elsewhere unknown.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn free_disk_bytes(_: &Path) -> Option<u64> {
    None
}

/// The bytes of `values` in this machine's order, without a copy: what f32 data is written to
/// a file as (little-endian files need a little-endian machine; callers check).
pub fn f32_bytes(values: &[f32]) -> &[u8] {
    #[allow(unsafe_code)]
    // SAFETY: any f32 is 4 initialised bytes, u8 has no alignment, and the length covers exactly
    // the same memory, borrowed for as long as `values`.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// [`f32_bytes`] to read into: every bit pattern is a valid f32, so a file's bytes can fill
/// `values` directly.
pub fn f32_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    #[allow(unsafe_code)]
    // SAFETY: as f32_bytes, borrowed mutably; any 4 bytes written form a valid f32.
    unsafe {
        std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn walk_files_survives_link_loops_and_lists_each_file_once() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let sub = dir.path().join("sub");
        fs_err::create_dir(&sub)?;
        fs_err::write(sub.join("a.pth"), b"x")?;
        fs_err::write(dir.path().join("b.pth"), b"y")?;
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path(), sub.join("loop"))?;
            std::os::unix::fs::symlink(sub.join("a.pth"), dir.path().join("alias.pth"))?;
            std::os::unix::fs::symlink(dir.path().join("gone"), dir.path().join("dangling.pth"))?;
        }
        let found = walk_files(dir.path())?;
        let names: Vec<String> =
            found.iter().map(|p| p.strip_prefix(dir.path()).unwrap_or(p).display().to_string()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        Ok(())
    }

    use super::*;

    #[test]
    fn a_flush_that_fails_on_drop_is_reported() {
        // /dev/full accepts opens and fails every write with ENOSPC.
        let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else { return };
        let (mut w, outcome) = CheckedWriter::new(full);
        // Small writes only fill the buffer; the failure comes when it is flushed on drop.
        w.write_all(&[7u8; 1000]).unwrap_or_default();
        drop(w);
        let (_, err) = outcome.lock().map(|g| g.clone()).unwrap_or_default();
        assert!(err.is_some_and(|e| e.contains("space")), "a full disk went unnoticed");
    }

    #[test]
    fn devices_and_folders_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let err = write_atomic(dir.path(), b"x").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("not a regular file"), "{err}");
        if Path::new("/dev/null").exists() {
            let err =
                write_atomic(Path::new("/dev/null"), b"png").err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("not a regular file"), "{err}");
            let m = std::fs::symlink_metadata("/dev/null").unwrap_or_else(|e| panic!("{e}"));
            assert!(!m.file_type().is_file(), "/dev/null was replaced");
        }
        let file = dir.path().join("a.png");
        write_atomic(&file, b"one").unwrap_or_else(|e| panic!("{e}"));
        write_atomic(&file, b"two").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(std::fs::read(&file).unwrap_or_default(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
            // The process umask, as Linux reports it; new files get 0666 less it.
            let umask = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_string())))
                .and_then(|v| u32::from_str_radix(&v, 8).ok());
            if let Some(umask) = umask {
                assert_eq!(mode, 0o666 & !umask, "outputs follow the umask, not 0600");
            }
        }
    }
}
