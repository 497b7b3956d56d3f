//! The one place that names the environment variables kiln reads.

/// Overrides the Hugging Face cache root (shared with diffusers/transformers).
pub const HF_HOME: &str = "HF_HOME";
/// Overrides the hub cache folder directly (`$HF_HOME/hub` by default).
pub const HF_HUB_CACHE: &str = "HF_HUB_CACHE";
/// When set to 1/true, never touch the network: only the local cache is used.
pub const HF_HUB_OFFLINE: &str = "HF_HUB_OFFLINE";
/// Hugging Face access token for gated repos.
pub const HF_TOKEN: &str = "HF_TOKEN";
/// Overrides kiln's data dir (imported models, libraries); default `$XDG_DATA_HOME/kiln`.
pub const KILN_DATA_DIR: &str = "KILN_DATA_DIR";
/// `off` stops kiln from writing and using pre-laid-out weight files (loaders/layout_cache.rs)
/// under `<data dir>/layout-cache`; on by default.
pub const KILN_LAYOUT_CACHE: &str = "KILN_LAYOUT_CACHE";
/// The size that layout cache is kept under (e.g. `40G`); default 32 GiB.
pub const KILN_LAYOUT_CACHE_MAX: &str = "KILN_LAYOUT_CACHE_MAX";
/// XDG base dir for user data.
pub const XDG_DATA_HOME: &str = "XDG_DATA_HOME";
/// XDG base dir for user config (kiln reads `kiln/tiers.toml` there).
pub const XDG_CONFIG_HOME: &str = "XDG_CONFIG_HOME";
/// The project folder (kiln.toml, asset library) when `--project` is not given; default: cwd.
pub const KILN_PROJECT: &str = "KILN_PROJECT";
/// A PostgreSQL URL holding the project's library, queue and ledger, shared by servers and
/// workers on several boxes (`--database`); unset = the embedded SQLite library.
pub const KILN_DATABASE_URL: &str = "KILN_DATABASE_URL";
/// Tests only: a PostgreSQL server URL (`postgres://user@host:port/db`) the database suites
/// create their scratch databases on; CI sets it after starting PostgreSQL.
pub const KILN_TEST_POSTGRES: &str = "KILN_TEST_POSTGRES";
/// Tests only: when truthy, a missing KILN_TEST_POSTGRES fails the PostgreSQL suites instead
/// of skipping them (CI sets it, so they cannot pass unrun).
pub const KILN_REQUIRE_POSTGRES: &str = "KILN_REQUIRE_POSTGRES";
/// Tests only: the device the parity suites run on (`cpu`, `cuda`, `cuda:N`, `metal`).
pub const KILN_TEST_DEVICE: &str = "KILN_TEST_DEVICE";
/// Tests only: the dtype the parity suites run in (`f32`, `f16`, `bf16`).
pub const KILN_TEST_DTYPE: &str = "KILN_TEST_DTYPE";
/// The user's home folder.
pub const HOME: &str = "HOME";

/// True when the variable is set to a truthy value (`1`, `true`, `yes`, `on`).
pub fn flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// kiln's data folder: KILN_DATA_DIR, else $XDG_DATA_HOME/kiln, else ~/.local/share/kiln
/// (empty variables count as unset). The one place this rule lives.
pub fn data_dir() -> Option<std::path::PathBuf> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    non_empty(KILN_DATA_DIR)
        .or_else(|| non_empty(XDG_DATA_HOME).map(|d| d.join("kiln")))
        .or_else(|| non_empty(HOME).map(|h| h.join(".local").join("share").join("kiln")))
}
/// `kiln serve`'s log filter (tracing's env-filter syntax, e.g. `info`, `kiln_server=debug`).
pub const KILN_LOG: &str = "KILN_LOG";
