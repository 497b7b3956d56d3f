//! API keys: stored as sha256 hashes in the project library, compared in constant time, each
//! with an optional daily credit quota. Once a project has an active key, the server requires
//! one on every request.

use crate::error::{Error, Result};
use crate::library::{now_unix, Library, Project};
use crate::vals;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Prefix of every key kiln makes (so a leaked one is recognisable).
pub const KEY_PREFIX: &str = "kiln_";

/// A key as listed (never the key itself).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KeyInfo {
    pub name: String,
    /// Credits per day; None = unlimited.
    pub quota: Option<f64>,
    pub created_at: i64,
    pub revoked: bool,
}

/// The project's keys.
pub struct Keys {
    lib: Library,
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Equality that takes the same time wherever the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    fs_err::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(hex::encode(buf))
}

impl Keys {
    pub fn open(project: &Project) -> Result<Self> {
        Ok(Self { lib: project.library()? })
    }

    /// Adds a key named `name` and returns it (shown once; only its hash is kept).
    pub fn add(&mut self, name: &str, quota: Option<f64>) -> Result<String> {
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(Error::arg("NAME", "use 1-64 letters, digits, '-', '_', '.' or '@'"));
        }
        if let Some(q) = quota {
            if !(q.is_finite() && q >= 0.0) {
                return Err(Error::arg("quota", format!("{q} must be a finite number >= 0")));
            }
        }
        let exists: Option<i64> = self
            .lib
            .db
            .query_opt("SELECT id FROM api_keys WHERE name = ?1", vals![name], |r| r.get(0))
            .map_err(|e| self.lib.err(e))?;
        if exists.is_some() {
            return Err(Error::arg(
                "NAME",
                format!("a key named `{name}` exists; revoke it or pick another name"),
            ));
        }
        let key = format!("{KEY_PREFIX}{}", random_hex(24)?);
        self.lib
            .db
            .execute(
                "INSERT INTO api_keys (name, hash, quota, created_at) VALUES (?1, ?2, ?3, ?4)",
                vals![name, hex::encode(hash(&key)), quota, now_unix()],
            )
            .map_err(|e| self.lib.err(e))?;
        Ok(key)
    }

    pub fn list(&self) -> Result<Vec<KeyInfo>> {
        self.lib
            .db
            .query_map("SELECT name, quota, created_at, revoked_at FROM api_keys ORDER BY id", vals![], |r| {
                Ok(KeyInfo {
                    name: r.get(0)?,
                    quota: r.get(1)?,
                    created_at: r.get(2)?,
                    revoked: r.get::<Option<i64>>(3)?.is_some(),
                })
            })
            .map_err(|e| self.lib.err(e))
    }

    /// Revokes the key named `name`.
    pub fn revoke(&mut self, name: &str) -> Result<()> {
        let n = self
            .lib
            .db
            .execute(
                "UPDATE api_keys SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL",
                vals![now_unix(), name],
            )
            .map_err(|e| self.lib.err(e))?;
        if n == 0 {
            return Err(Error::UnknownId { what: "active key".into(), id: name.to_string() });
        }
        Ok(())
    }

    /// Whether any key is active (the server then requires one).
    pub fn any_active(&self) -> Result<bool> {
        self.lib
            .db
            .query_row("SELECT EXISTS(SELECT 1 FROM api_keys WHERE revoked_at IS NULL)", vals![], |r| {
                r.get(0)
            })
            .map_err(|e| self.lib.err(e))
    }

    /// The active key `key` is, if any.
    pub fn verify(&self, key: &str) -> Result<Option<KeyInfo>> {
        let presented = hash(key);
        let rows = self
            .lib
            .db
            .query_map(
                "SELECT name, quota, created_at, hash FROM api_keys WHERE revoked_at IS NULL",
                vals![],
                |r| {
                    Ok((r.get::<String>(0)?, r.get::<Option<f64>>(1)?, r.get::<i64>(2)?, r.get::<String>(3)?))
                },
            )
            .map_err(|e| self.lib.err(e))?;
        // Every stored hash is compared, so the time taken does not tell which key matched.
        let mut found = None;
        for (name, quota, created_at, stored) in rows {
            let stored = hex::decode(stored).unwrap_or_default();
            if constant_time_eq(&stored, &presented) {
                found = Some(KeyInfo { name, quota, created_at, revoked: false });
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hashed_verified_and_revoked() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let project = Project::open(dir.path())?;
        let mut keys = Keys::open(&project)?;
        assert!(!keys.any_active()?);
        let key = keys.add("alice", Some(5.0))?;
        assert!(key.starts_with(KEY_PREFIX));
        assert!(keys.any_active()?);
        assert_eq!(keys.verify(&key)?.map(|k| k.name), Some("alice".into()));
        assert!(keys.verify("kiln_wrong")?.is_none());
        assert!(keys.add("alice", None).is_err());
        keys.revoke("alice")?;
        assert!(keys.verify(&key)?.is_none());
        assert!(keys.revoke("alice").is_err());
        Ok(())
    }
}
