//! `kiln assets check`: the library verifies what it claims. SQLite's own integrity and
//! foreign-key checks; every recorded file exists, still has its recorded sha256 and decodes
//! as an image of its recorded size; lineage has no cycles; and the ledger adds up (a job's
//! device seconds are the sum of its stages, its credits the sum of its assets' credits).

use super::{assets, Library};
use crate::error::Result;
use std::collections::{BTreeMap, BTreeSet};

/// Absolute slack for sums of floating-point seconds and credits (stored as SQLite REAL).
const SUM_TOLERANCE: f64 = 1e-6;

impl Library {
    /// Consistency problems, one line each, naming the asset or job. Empty = consistent.
    pub fn check(&self) -> Result<Vec<String>> {
        let mut problems = self.sqlite_problems()?;
        let assets = self.list_assets(&assets::AssetFilter::default())?;
        for asset in &assets {
            if let Some(p) = self.file_problem(asset)? {
                problems.push(format!("asset {} {p}: {}", asset.id, asset.path));
            }
        }
        problems.extend(lineage_cycles(&assets));
        problems.extend(self.ledger_problems(&assets)?);
        Ok(problems)
    }

    fn sqlite_problems(&self) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        // PostgreSQL keeps its own integrity and enforces the references on every write.
        if self.engine() != crate::store::Engine::Sqlite {
            return Ok(problems);
        }
        let integrity: String = self
            .db
            .query_row("PRAGMA integrity_check", crate::vals![], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        if integrity != "ok" {
            problems.push(format!("integrity_check: {integrity}"));
        }
        let fk: Vec<String> = self
            .db
            .query_map("PRAGMA foreign_key_check", crate::vals![], |r| {
                Ok(format!("{}:{}", r.get::<String>(0)?, r.get::<i64>(1)?))
            })
            .map_err(|e| self.err(e))?;
        problems.extend(fk.into_iter().map(|row| format!("dangling reference in {row}")));
        Ok(problems)
    }

    /// What is wrong with an asset's file, if anything: missing, changed since it was
    /// recorded, not decodable, or not the recorded size.
    fn file_problem(&self, asset: &assets::AssetRow) -> Result<Option<String>> {
        // A shared library's file made on another box is fetched from the database first (its
        // bytes are checked against the recorded hash on the way).
        let path = match self.local_file(asset) {
            Ok(p) => p,
            Err(e) if self.shares_files() => {
                return Ok(Some(format!("file missing here and in the database ({e})")))
            }
            Err(e) => return Err(e),
        };
        if !path.is_file() {
            return Ok(Some("file missing".into()));
        }
        if crate::loaders::weights::sha256_file(&path)? != asset.sha256 {
            return Ok(Some("file changed since it was recorded".into()));
        }
        // A file recorded with its hash can still be one that never was a whole image.
        match crate::image::load_dynamic(&path) {
            Err(e) => Ok(Some(format!("file does not decode ({e})"))),
            Ok(img) if (img.width(), img.height()) != (asset.width, asset.height) => Ok(Some(format!(
                "file is {}x{} but was recorded as {}x{}",
                img.width(),
                img.height(),
                asset.width,
                asset.height
            ))),
            Ok(_) => Ok(None),
        }
    }

    fn ledger_problems(&self, assets: &[assets::AssetRow]) -> Result<Vec<String>> {
        let mut asset_credits: BTreeMap<i64, f64> = BTreeMap::new();
        for a in assets {
            *asset_credits.entry(a.job_id).or_default() += a.credits;
        }
        let mut problems = Vec::new();
        for job in self.jobs()? {
            let stages = job.timings.device_seconds();
            if !close(stages, job.device_seconds) {
                problems.push(format!(
                    "job {} records {:.6} device seconds but its stages sum to {stages:.6}",
                    job.id, job.device_seconds
                ));
            }
            let billed = asset_credits.get(&job.id).copied().unwrap_or(0.0);
            if !close(billed, job.credits) {
                problems.push(format!(
                    "job {} costs {:.6} credits but its assets carry {billed:.6}",
                    job.id, job.credits
                ));
            }
        }
        Ok(problems)
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= SUM_TOLERANCE * (1.0 + a.abs().max(b.abs()))
}

/// Assets whose parent chain comes back to an asset already on it (kiln never writes one; an
/// edited database can), each cycle reported once with its members.
fn lineage_cycles(assets: &[assets::AssetRow]) -> Vec<String> {
    let parent: BTreeMap<i64, Option<i64>> = assets.iter().map(|a| (a.id, a.parent_id)).collect();
    let mut settled: BTreeSet<i64> = BTreeSet::new();
    let mut problems = Vec::new();
    for &start in parent.keys() {
        let mut path: Vec<i64> = Vec::new();
        let mut at = Some(start);
        while let Some(id) = at {
            if settled.contains(&id) {
                break;
            }
            if let Some(pos) = path.iter().position(|&p| p == id) {
                let cycle: Vec<String> = path[pos..].iter().map(|i| format!("#{i}")).collect();
                problems.push(format!(
                    "lineage cycle: {} -> #{id} (an asset cannot descend from itself)",
                    cycle.join(" -> ")
                ));
                break;
            }
            path.push(id);
            at = parent.get(&id).copied().flatten();
        }
        settled.extend(path);
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(id: i64, parent_id: Option<i64>) -> assets::AssetRow {
        assets::AssetRow {
            id,
            job_id: 1,
            parent_id,
            kind: "draft".into(),
            tier: None,
            path: String::new(),
            sha256: String::new(),
            width: 1,
            height: 1,
            seed: None,
            prompt: None,
            record: None,
            model_hashes: vec![],
            credits: 0.0,
            created_at: 0,
            params: None,
            qc: None,
        }
    }

    #[test]
    fn cycles_are_found_once_and_chains_pass() {
        let chain = [asset(1, None), asset(2, Some(1)), asset(3, Some(2))];
        assert!(lineage_cycles(&chain).is_empty());
        let looped =
            [asset(1, Some(3)), asset(2, Some(1)), asset(3, Some(2)), asset(4, Some(2)), asset(5, Some(5))];
        let found = lineage_cycles(&looped);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("#1 -> #3 -> #2 -> #1"), "{found:?}");
        assert!(found[1].contains("#5 -> #5"), "{found:?}");
    }
}
