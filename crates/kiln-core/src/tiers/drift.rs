//! Drift guard: the project's `kiln.lock` records the weight hashes each tier was first run
//! with; a later load whose files differ is refused (naming the files) until the user moves on
//! deliberately with `--accept-drift`, which re-pins the lock. This catches a re-downloaded
//! `main`, a swapped VAE or an edited local folder before it silently changes a campaign's look.

use super::Tier;
use crate::error::{Error, Result};
use crate::pipeline::model::{LoadedModel, WeightRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The lock file's name in the project folder.
pub const LOCK_FILE: &str = "kiln.lock";

/// The whole lock file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Lock {
    #[serde(default)]
    pub tiers: BTreeMap<String, LockedTier>,
}

/// What a tier was pinned to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedTier {
    pub model: String,
    #[serde(default)]
    pub vae: Option<String>,
    pub files: Vec<WeightRecord>,
}

/// What the check found.
#[derive(Debug, Clone, PartialEq)]
pub enum DriftOutcome {
    /// First use of the tier in this project: the lock now pins what was loaded.
    Pinned,
    /// Same files as the lock.
    Unchanged,
    /// Files changed and `--accept-drift` re-pinned them; the changes are listed.
    Accepted(Vec<String>),
}

impl Lock {
    /// Reads the lock; an absent file is an empty lock, a corrupt one an error naming it.
    pub fn read(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = fs_err::read_to_string(path)?;
        toml::from_str(&text).map_err(|e| {
            Error::config(path, format!("{e}; delete the file to re-pin every tier on next use"))
        })
    }

    /// Writes the lock atomically (temp file + rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let body = toml::to_string_pretty(self).map_err(|e| Error::config(path, e.to_string()))?;
        let text = format!(
            "# kiln.lock: the weight files each tier was pinned to (sha256). Written by kiln; \
             change with --accept-drift.\n{body}"
        );
        write_atomic(path, text.as_bytes())
    }
}

/// The differences between locked and loaded files, one line each.
pub fn differences(locked: &LockedTier, tier: &Tier, loaded: &[WeightRecord]) -> Vec<String> {
    let mut out = Vec::new();
    if locked.model != tier.model {
        out.push(format!("model changed: locked `{}`, tier now `{}`", locked.model, tier.model));
    }
    if locked.vae != tier.vae {
        out.push(format!("vae changed: locked {:?}, tier now {:?}", locked.vae, tier.vae));
    }
    let key = |w: &WeightRecord| format!("{}/{}", w.component, w.file);
    let before: BTreeMap<String, &str> = locked.files.iter().map(|w| (key(w), w.sha256.as_str())).collect();
    let after: BTreeMap<String, &str> = loaded.iter().map(|w| (key(w), w.sha256.as_str())).collect();
    for (k, old) in &before {
        match after.get(k) {
            Some(new) if new != old => out.push(format!("{k} changed: locked sha256 {old}, now {new}")),
            None => out.push(format!("{k} no longer loaded (locked sha256 {old})")),
            _ => {}
        }
    }
    for (k, new) in &after {
        if !before.contains_key(k) {
            out.push(format!("{k} is new (sha256 {new})"));
        }
    }
    out
}

/// Compares the loaded model with the project lock at `lock_path`: pins on first use, refuses
/// drift unless `accept`, in which case the lock is updated and the changes returned.
pub fn check(lock_path: &Path, tier: &Tier, model: &LoadedModel, accept: bool) -> Result<DriftOutcome> {
    check_files(lock_path, tier, &model.weights, accept)
}

/// [`check`] for any loaded weight files (an upscale tier's model, ...).
pub fn check_files(
    lock_path: &Path,
    tier: &Tier,
    loaded: &[WeightRecord],
    accept: bool,
) -> Result<DriftOutcome> {
    let mut lock = Lock::read(lock_path)?;
    let current = LockedTier { model: tier.model.clone(), vae: tier.vae.clone(), files: loaded.to_vec() };
    let outcome = match lock.tiers.get(&tier.name) {
        None => DriftOutcome::Pinned,
        Some(locked) => {
            let diffs = differences(locked, tier, loaded);
            if diffs.is_empty() {
                return Ok(DriftOutcome::Unchanged);
            }
            if !accept {
                return Err(Error::config(
                    lock_path,
                    format!(
                        "tier `{}` drifted from the lock:\n  {}\nthe look of this project's images may change; \
                         rerun with --accept-drift to re-pin deliberately",
                        tier.name,
                        diffs.join("\n  ")
                    ),
                ));
            }
            DriftOutcome::Accepted(diffs)
        }
    };
    lock.tiers.insert(tier.name.clone(), current);
    lock.write(lock_path)?;
    Ok(outcome)
}

pub use crate::files::write_atomic;
