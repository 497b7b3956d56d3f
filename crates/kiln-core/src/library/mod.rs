//! The project: a folder with `kiln.toml` (tiers, budget, policy), `kiln.lock` (drift guard),
//! `assets/` (the images) and `.kiln/library.db`, an SQLite database of every job and asset
//! with its lineage, parameters, model hashes, timings, device and cost.
//!
//! Consistency: an output is written atomically (temp file + rename) *before* it is recorded,
//! and a job with all its assets is recorded in one transaction, so a killed run leaves at most
//! unrecorded files (reported by [`Library::check`] as orphans), never a record without its file.
//!
//! - [`assets`]: recording jobs and assets, queries, lineage;
//! - [`ledger`]: costs, budget, reports;
//! - `check`: `kiln assets check` (files, hashes, decoding, lineage cycles, ledger sums);
//! - [`qc`]: hallucination-QC reports stored on assets (`kiln qc`);
//! - [`shared`]: image bytes in a shared database, for servers and workers on other boxes.

pub mod assets;
mod check;
pub mod ledger;
pub mod qc;
pub mod shared;

use crate::error::{Error, Result};
use crate::store::{Db, DbError};
use crate::tiers::drift::LOCK_FILE;
use crate::tiers::TierRegistry;
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The project's config file.
pub const PROJECT_FILE: &str = "kiln.toml";
/// The library database, relative to the project root.
pub const LIBRARY_DB: &str = ".kiln/library.db";
/// Where outputs go, relative to the project root.
pub const ASSETS_DIR: &str = "assets";
/// The schema version this kiln writes.
pub use crate::store::migrate::SCHEMA_VERSION;

/// `[budget]` in kiln.toml, in credits over the project's life.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Hard limit: a job that would pass it is refused.
    pub limit: f64,
    /// Warn from here on (default: 80% of the limit).
    #[serde(default)]
    pub warn_at: Option<f64>,
}

impl Budget {
    pub fn warn_threshold(&self) -> f64 {
        self.warn_at.unwrap_or(self.limit * 0.8)
    }
}

/// `[policy]` in kiln.toml.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The healthy number of drafts per final (4 means 4:1).
    #[serde(default = "default_drafts_per_final")]
    pub drafts_per_final: f64,
}

fn default_drafts_per_final() -> f64 {
    4.0
}

impl Default for Policy {
    fn default() -> Self {
        Self { drafts_per_final: default_drafts_per_final() }
    }
}

/// The non-tier parts of kiln.toml (tiers are read by [`TierRegistry`]). Any other table is an
/// error: a misspelt `[budgett]` must not silently leave the project without a budget.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    #[serde(default)]
    pub budget: Option<Budget>,
    #[serde(default)]
    pub policy: Policy,
    /// Read by the tier registry.
    #[serde(default, skip_serializing)]
    tiers: Option<toml::Table>,
    /// Read by the preset registry.
    #[serde(default, skip_serializing)]
    presets: Option<toml::Table>,
}

/// A project folder.
#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
    pub config: ProjectConfig,
    /// A PostgreSQL URL holding the library, queue and ledger shared by several processes
    /// and boxes (`--database`, `KILN_DATABASE_URL`); None = the embedded SQLite file.
    pub database: Option<String>,
}

impl Project {
    /// The project at `explicit`, else $KILN_PROJECT, else the current folder.
    pub fn find(explicit: Option<&Path>) -> Result<Self> {
        let named = match explicit {
            Some(p) => Some(p.to_path_buf()),
            None => std::env::var_os(crate::env::KILN_PROJECT).filter(|p| !p.is_empty()).map(PathBuf::from),
        };
        let root = match named {
            // A named project must exist: a typo must not quietly start a new, empty one.
            Some(p) if !p.exists() => {
                return Err(Error::not_found(
                    "project folder",
                    &p,
                    "create it first (mkdir), or name an existing project with --project or KILN_PROJECT",
                ))
            }
            Some(p) => p,
            None => std::env::current_dir()?,
        };
        Self::open(&root)
    }

    /// Opens the project rooted at `root` (created on first write; kiln.toml is optional).
    pub fn open(root: &Path) -> Result<Self> {
        if root.exists() && !root.is_dir() {
            return Err(Error::arg("--project", format!("{} is not a folder", root.display())));
        }
        let root = if root.is_absolute() { root.to_path_buf() } else { std::env::current_dir()?.join(root) };
        let file = root.join(PROJECT_FILE);
        let config = if file.is_file() {
            let text = fs_err::read_to_string(&file)?;
            toml::from_str(&text).map_err(|e| Error::config(&file, e.to_string()))?
        } else {
            ProjectConfig::default()
        };
        if let Some(b) = &config.budget {
            if !(b.limit.is_finite() && b.limit >= 0.0) || b.warn_at.is_some_and(|w| !w.is_finite()) {
                return Err(Error::config(
                    &file,
                    "budget.limit and budget.warn_at must be finite numbers >= 0",
                ));
            }
        }
        if !(config.policy.drafts_per_final.is_finite() && config.policy.drafts_per_final > 0.0) {
            return Err(Error::config(&file, "policy.drafts_per_final must be a number > 0"));
        }
        let database = std::env::var(crate::env::KILN_DATABASE_URL).ok().filter(|u| !u.is_empty());
        let project = Self { root, config, database: None };
        project.with_database(database)
    }

    /// This project with its library in the database at `url` (a PostgreSQL URL, or a SQLite
    /// file path; None keeps the project's own `.kiln/library.db`).
    pub fn with_database(mut self, url: Option<String>) -> Result<Self> {
        self.database = match url {
            None => None,
            Some(u) if crate::store::is_postgres_url(&u) => Some(u),
            Some(u) => {
                return Err(Error::arg(
                    "--database",
                    format!(
                        "`{}` is not a postgres://… URL; the embedded SQLite library needs no URL (leave \
                         --database and KILN_DATABASE_URL unset)",
                        crate::store::redact_url(&u)
                    ),
                ))
            }
        };
        Ok(self)
    }

    /// The tier registry as this project sees it (built-in, user, kiln.toml).
    pub fn tiers(&self) -> Result<TierRegistry> {
        TierRegistry::discover(Some(&self.root))
    }

    /// The presets as this project sees them (user, kiln.toml).
    pub fn presets(&self) -> Result<crate::tiers::presets::PresetRegistry> {
        crate::tiers::presets::PresetRegistry::discover(Some(&self.root))
    }

    pub fn lock_path(&self) -> PathBuf {
        self.root.join(LOCK_FILE)
    }

    pub fn assets_dir(&self) -> PathBuf {
        self.root.join(ASSETS_DIR)
    }

    pub fn library_path(&self) -> PathBuf {
        self.root.join(LIBRARY_DB)
    }

    /// Opens (creating on first use) the library database.
    pub fn library(&self) -> Result<Library> {
        match &self.database {
            Some(url) => Library::open_postgres(url, &self.root),
            None => Library::open(&self.library_path(), &self.root),
        }
    }

    /// Opens the library for reading; a project without one is an error (nothing is created,
    /// so `kiln report` in the wrong folder says so instead of leaving an empty database).
    pub fn existing_library(&self) -> Result<Library> {
        let path = self.library_path();
        if self.database.is_none() && !path.is_file() {
            return Err(Error::not_found(
                "asset library",
                &path,
                "no kiln jobs have run in this project yet; pass --project DIR or set KILN_PROJECT",
            ));
        }
        self.library()
    }

    /// A path relative to the project root when it lies inside it.
    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root).unwrap_or(path).to_string_lossy().into_owned()
    }
}

/// The open library database.
pub struct Library {
    pub(crate) db: Db,
    pub(crate) path: PathBuf,
    pub(crate) root: PathBuf,
    /// The queue row (id, attempt) this connection records for; see [`Library::claim_for_queue`].
    pub(crate) queue_claim: Option<(i64, i64)>,
}

/// Creates a new, empty library at `path` atomically: built under a temporary name beside it
/// and linked into place only if nothing is there yet. Another process opening the project at
/// the same moment therefore never sees a half-made (0-byte) file, which [`Library::open`]
/// refuses as a destroyed library; if it created the library first, its file is kept.
fn create_new(path: &Path) -> Result<()> {
    let tmp = crate::files::temp_beside(path, ".db-new")?;
    let made = (|| -> std::result::Result<(), String> {
        let conn = Connection::open(tmp.path()).map_err(|e| e.to_string())?;
        conn.execute_batch("PRAGMA synchronous = FULL;").map_err(|e| e.to_string())?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .map_err(|e| e.to_string())?;
        let db = Db::Sqlite(conn);
        crate::store::migrate::apply(&db).map_err(|e| e.to_string())?;
        let Db::Sqlite(conn) = db else { return Err("not a SQLite connection".into()) };
        // Closing checkpoints the log into the file and removes it.
        conn.close().map_err(|(_, e)| e.to_string())
    })();
    made.map_err(|e| Error::Library {
        path: path.to_path_buf(),
        msg: format!("cannot create the library: {e}"),
    })?;
    tmp.as_file().sync_all()?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(()),
        // Someone else created it first: theirs is the library.
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => {
            Err(Error::Io(std::io::Error::new(e.error.kind(), format!("{}: {}", path.display(), e.error))))
        }
    }
}

/// The error for a database SQLite cannot read.
fn unreadable(path: &Path, e: rusqlite::Error) -> Error {
    Error::Library {
        path: path.to_path_buf(),
        msg: format!(
            "{e}; the database is unreadable or corrupt: move it aside (assets/ keeps the images and their metadata)"
        ),
    }
}

/// The once-per-file checks and set-up of an open library: integrity, WAL, schema (created
/// where missing) and its version.
fn prepare(conn: &Connection, path: &Path) -> Result<()> {
    let bad = |e| unreadable(path, e);
    let integrity: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).map_err(bad)?;
    if integrity != "ok" {
        return Err(Error::Library {
            path: path.to_path_buf(),
            msg: format!("integrity check failed: {integrity}; move the file aside to start a new library"),
        });
    }
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)).map_err(bad)?;
    Ok(())
}

/// Applies the schema migrations, naming the database in any error.
fn migrate(db: &Db, path: &Path) -> Result<()> {
    crate::store::migrate::apply(db)
        .map(|_| ())
        .map_err(|e| Error::Library { path: path.to_path_buf(), msg: e.to_string() })
}

impl Library {
    /// Opens or creates the database at `path` for the project at `root`. A file that is not
    /// a kiln library (corrupt, or another program's) is refused with the path and what to do.
    pub fn open(path: &Path, root: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            fs_err::create_dir_all(dir)?;
        }
        let bad = |e| unreadable(path, e);
        // An empty or truncated file is not a new library: opening it would silently start over,
        // losing the history and the budget's spend.
        if let Ok(m) = std::fs::metadata(path) {
            if m.len() == 0 {
                return Err(Error::Library {
                    path: path.to_path_buf(),
                    msg:
                        "the file is empty (0 bytes), not a kiln library; restore it from a backup, or move \
                          it aside to start a new library (assets/ keeps the images and their metadata)"
                            .into(),
                });
            }
        }
        if std::fs::symlink_metadata(path).is_err() {
            create_new(path)?;
        }
        let conn = Connection::open(path).map_err(bad)?;
        // WAL: the server's readers (queue listing, events) never wait for a job's write, and a
        // killed writer's log is replayed on the next open.
        conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(bad)?;
        conn.execute_batch("PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;").map_err(bad)?;
        // The integrity check, WAL switch, schema and version check are per file, not per
        // connection: a server opens the library on every request, and quick_check reads the
        // whole database. They run on the first open of this file in this process.
        let identity = file_identity(path);
        let db = Db::Sqlite(conn);
        if !identity.as_ref().is_some_and(already_prepared) {
            if let Db::Sqlite(conn) = &db {
                prepare(conn, path)?;
            }
            migrate(&db, path)?;
            if let Some(id) = identity {
                mark_prepared(id);
            }
        }
        Ok(Self { db, path: path.to_path_buf(), root: root.to_path_buf(), queue_claim: None })
    }

    /// Opens the shared library in the PostgreSQL database at `url` for the project at `root`
    /// (its files: kiln.toml, assets/). The schema is migrated on the first open per process.
    pub fn open_postgres(url: &str, root: &Path) -> Result<Self> {
        let shown = PathBuf::from(crate::store::redact_url(url));
        let conn = crate::store::pg::connect(url)
            .map_err(|e| Error::Library { path: shown.clone(), msg: e.to_string() })?;
        let db = Db::Postgres(Box::new(std::cell::RefCell::new(conn)));
        let identity = (PathBuf::from(url), 0);
        if !already_prepared(&identity) {
            migrate(&db, &shown)?;
            mark_prepared(identity);
        }
        Ok(Self { db, path: shown, root: root.to_path_buf(), queue_claim: None })
    }

    /// Where the library is: its SQLite file, or the PostgreSQL URL without its password.
    pub fn location(&self) -> &Path {
        &self.path
    }

    /// Which database engine holds this library.
    pub fn engine(&self) -> crate::store::Engine {
        self.db.engine()
    }

    /// Makes every job this connection records part of queue row `id`'s attempt `attempt`:
    /// the record commits only while that row is still running that attempt, so a job that
    /// was recovered and re-run by someone else is never recorded twice.
    pub fn claim_for_queue(&mut self, id: i64, attempt: i64) {
        self.queue_claim = Some((id, attempt));
    }

    /// A library that keeps nothing (jobs without a project: `generate --model`), so running
    /// them never creates a database in the current folder.
    pub fn in_memory(root: &Path) -> Result<Self> {
        let path = PathBuf::from(":memory:");
        let bad = |e: rusqlite::Error| Error::Library { path: path.clone(), msg: e.to_string() };
        let conn = Connection::open_in_memory().map_err(bad)?;
        let db = Db::Sqlite(conn);
        migrate(&db, &path)?;
        Ok(Self { db, path, root: root.to_path_buf(), queue_claim: None })
    }

    pub(crate) fn err(&self, e: DbError) -> Error {
        library_error(&self.path, e)
    }

    /// Image files under assets/ that no asset records (left by a killed run; safe to delete).
    pub fn orphans(&self) -> Result<Vec<PathBuf>> {
        let recorded: std::collections::BTreeSet<String> =
            self.list_assets(&assets::AssetFilter::default())?.into_iter().map(|a| a.path).collect();
        Ok(self.asset_files().into_iter().filter(|p| !recorded.contains(&self.relative(p))).collect())
    }

    /// Every file under assets/, sorted.
    pub fn asset_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.join(ASSETS_DIR)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let p = entry.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    /// `path` relative to the project root, as assets record it.
    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root).unwrap_or(path).to_string_lossy().into_owned()
    }

    /// Whether an asset records the file at `path`.
    pub fn records_file(&self, path: &Path) -> Result<bool> {
        self.db
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM assets WHERE path = ?1)",
                crate::vals![self.relative(path)],
                |r| r.get(0),
            )
            .map_err(|e| self.err(e))
    }
}

/// A database error as the user reads it: values kiln never writes mean the library was edited.
pub(crate) fn library_error(path: &Path, e: DbError) -> Error {
    let msg = match &e {
        // A value kiln never writes (a negative seed or size): the database was edited.
        DbError::OutOfRange { column, value } => format!(
            "a row holds {value} in column {column}, which kiln never writes: the library was edited \
             outside kiln; run `kiln assets check` and restore it from a backup"
        ),
        DbError::WrongType { column, found, .. } => format!(
            "column {column} holds a {found} value, which kiln never writes: the library was \
             edited outside kiln; run `kiln assets check` and restore it from a backup"
        ),
        DbError::Engine(msg) => msg.clone(),
    };
    Error::Library { path: path.to_path_buf(), msg }
}

/// A database file as the once-per-file preparation knows it: its path and, on Unix, its inode
/// (a file replaced under a running process is checked again).
type FileIdentity = (PathBuf, u64);

fn file_identity(path: &Path) -> Option<FileIdentity> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = meta.len();
    Some((std::fs::canonicalize(path).ok()?, inode))
}

fn prepared() -> &'static std::sync::Mutex<std::collections::HashSet<FileIdentity>> {
    static PREPARED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<FileIdentity>>> =
        std::sync::OnceLock::new();
    PREPARED.get_or_init(Default::default)
}

fn already_prepared(id: &FileIdentity) -> bool {
    prepared().lock().map(|set| set.contains(id)).unwrap_or(false)
}

fn mark_prepared(id: FileIdentity) {
    if let Ok(mut set) = prepared().lock() {
        set.insert(id);
    }
}

/// Seconds since the Unix epoch, with their fraction (queue and event times).
pub fn now_seconds() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A Unix time's UTC date as YYYY-MM-DD (Howard Hinnant's civil-from-days).
pub fn utc_date(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_mistakes_are_errors_not_silence() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let write = |text: &str| std::fs::write(dir.path().join(PROJECT_FILE), text).unwrap_or_default();
        write("[budgett]\nlimit = 5\n");
        let err = Project::open(dir.path()).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("budgett"), "{err}");
        write("[budget]\nlimit = 5\n[tiers.draft]\nsteps = 2\n");
        assert!(Project::open(dir.path()).is_ok());
        // A named project that does not exist is not created.
        let missing = dir.path().join("no-such-project");
        let err = Project::find(Some(&missing)).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("project folder not found"), "{err}");
        assert!(!missing.exists());
        // An empty library file is refused, not replaced by a fresh library.
        let project = Project::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(dir.path().join(".kiln")).unwrap_or_default();
        std::fs::write(project.library_path(), b"").unwrap_or_default();
        let err = project.library().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("empty"), "{err}");
        assert_eq!(std::fs::metadata(project.library_path()).map(|m| m.len()).unwrap_or(1), 0);
    }

    #[test]
    fn processes_creating_a_library_at_once_all_open_it() {
        // Openers racing on a project without a library: each must open the same, complete
        // library (never find the half-made file another one is creating and refuse it).
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
            let path = dir.path().join(".kiln").join("library.db");
            let opened: Vec<Result<Library>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8).map(|_| s.spawn(|| Library::open(&path, dir.path()))).collect();
                handles.into_iter().map(|h| h.join().unwrap_or_else(|_| panic!("opener panicked"))).collect()
            });
            for lib in opened {
                let lib = lib.unwrap_or_else(|e| panic!("{e}"));
                let lib = lib;
                let version: String = lib
                    .db
                    .query_row("SELECT value FROM meta WHERE key = 'schema_version'", &[], |r| r.get(0))
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(version, SCHEMA_VERSION.to_string());
            }
            let left: Vec<_> = std::fs::read_dir(dir.path().join(".kiln"))
                .unwrap_or_else(|e| panic!("{e}"))
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".db-new"))
                .collect();
            assert!(left.is_empty(), "temporary libraries left behind: {left:?}");
        }
    }

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14");
    }
}
