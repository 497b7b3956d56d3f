//! Image files across boxes. With the library in PostgreSQL, a job may run on one box and its
//! result be served, promoted or upscaled on another. Every output's bytes are stored in the
//! database under their sha256 (`blobs`), as are uploads; a box that lacks a file the library
//! records fetches it from there, checks its hash and writes it into its own project folder
//! atomically. The database is the one thing every node already reaches, so no shared file
//! system or object store has to be run beside it; images of a few MB to a few tens of MB
//! each are well within what PostgreSQL's bytea serves.

use super::assets::AssetRow;
use super::now_seconds as now;
use super::Library;
use crate::error::{Error, Result};
use crate::store::Engine;
use crate::vals;
use std::path::{Path, PathBuf};

fn sha256(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

impl Library {
    /// Whether files must travel through the database (a shared PostgreSQL library).
    pub fn shares_files(&self) -> bool {
        self.engine() == Engine::Postgres
    }

    /// Stores bytes under their sha256 (once; the same bytes again are a no-op).
    pub fn put_blob(&self, sha256: &str, bytes: &[u8]) -> Result<()> {
        self.db
            .execute(
                "INSERT INTO blobs (sha256, bytes, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (sha256) DO NOTHING",
                vals![sha256, bytes, now()],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The bytes stored under `sha256`, if any.
    pub fn blob(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        self.db
            .query_opt("SELECT bytes FROM blobs WHERE sha256 = ?1", vals![sha256], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Shares a file this box wrote (an output, an upload) when the library is shared.
    pub fn share_file(&self, path: &Path) -> Result<()> {
        if !self.shares_files() {
            return Ok(());
        }
        let bytes = fs_err::read(path)?;
        self.put_blob(&sha256(&bytes), &bytes)
    }

    /// The local file of `asset`: its path in this project, fetched from the database first
    /// when this box does not have it.
    pub fn local_file(&self, asset: &AssetRow) -> Result<PathBuf> {
        self.fetch_into(&self.root.join(&asset.path), &asset.sha256, &format!("asset {}", asset.id))
    }

    /// `path`, written from the bytes stored under `sha256` when it is missing here (a shared
    /// library's file from another box). Without a shared library, `path` as it is.
    pub fn fetch_into(&self, path: &Path, sha256: &str, what: &str) -> Result<PathBuf> {
        if path.is_file() || !self.shares_files() {
            return Ok(path.to_path_buf());
        }
        let bytes = self.blob(sha256)?.ok_or_else(|| {
            Error::not_found(
                format!("{what}'s file"),
                path,
                "the box that made it did not share it through the database; run the job again",
            )
        })?;
        if sha256 != self::sha256(&bytes) {
            return Err(Error::Library {
                path: self.path.clone(),
                msg: format!(
                    "the stored bytes of {what} do not match its sha256 {sha256}: the database was edited"
                ),
            });
        }
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir)?;
        }
        crate::files::write_atomic(path, &bytes)?;
        Ok(path.to_path_buf())
    }
}
