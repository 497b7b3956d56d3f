//! The cost ledger: what a job will cost (estimate, for the budget), whether the budget allows
//! it, and the project report (burn per day, draft:final ratio, cost per delivered asset).

use super::assets::JobRow;
use super::{utc_date, Library, ProjectConfig};
use crate::error::{Error, Result};
use crate::tiers::Tier;
use serde::Serialize;
use std::collections::BTreeMap;

/// A job's expected cost: the tier's per-image price plus its per-second price times the
/// tier's past average seconds per image (0 before the first job: the estimate is a floor).
pub fn estimate(library: &Library, tier: &Tier, images: usize) -> Result<f64> {
    let per_image_seconds = library.seconds_per_image(&tier.name)?.unwrap_or(0.0);
    Ok(tier.price.cost(images, per_image_seconds * images as f64))
}

/// Checks a job of estimated cost `estimate` against the project budget: an error when the
/// spend would pass the hard limit, a warning line when it passes the warning threshold.
pub fn check_budget(config: &ProjectConfig, spent: f64, estimate: f64) -> Result<Option<String>> {
    let Some(budget) = config.budget else { return Ok(None) };
    let after = spent + estimate;
    if spent >= budget.limit || after > budget.limit {
        return Err(Error::Budget(format!(
            "{spent:.4} of {:.4} credits spent; this job needs about {estimate:.4} more. Raise [budget] limit in kiln.toml to continue",
            budget.limit
        )));
    }
    if after >= budget.warn_threshold() {
        return Ok(Some(format!(
            "budget: {after:.4} of {:.4} credits will be spent after this job (warning at {:.4})",
            budget.limit,
            budget.warn_threshold()
        )));
    }
    Ok(None)
}

/// Jobs, images, device time and credits summed over some jobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Burn {
    pub jobs: usize,
    pub images: usize,
    pub device_seconds: f64,
    pub credits: f64,
}

impl Burn {
    fn add(&mut self, job: &JobRow) {
        self.jobs += 1;
        self.images += job.images;
        self.device_seconds += job.device_seconds;
        self.credits += job.credits;
    }
}

/// Credits and time of one UTC day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DayBurn {
    pub date: String,
    #[serde(flatten)]
    pub burn: Burn,
}

/// Totals of one tier (or job kind without a tier).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TierTotals {
    pub tier: String,
    #[serde(flatten)]
    pub burn: Burn,
}

/// The project report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub days: Vec<DayBurn>,
    pub tiers: Vec<TierTotals>,
    pub jobs: usize,
    pub total_credits: f64,
    pub total_device_seconds: f64,
    /// Draft images (assets of kind `draft`).
    pub drafts: usize,
    /// Final images (assets of kind `final`): the delivered assets.
    pub finals: usize,
    /// drafts / finals (None before the first final).
    pub drafts_per_final: Option<f64>,
    pub policy_drafts_per_final: f64,
    /// "within policy", "more drafts per final than the policy", "fewer drafts per final than the policy".
    pub policy_verdict: String,
    /// Total credits / finals (None before the first final).
    pub cost_per_delivered: Option<f64>,
    pub budget_limit: Option<f64>,
    pub budget_left: Option<f64>,
}

/// Builds the report from the ledger.
pub fn report(library: &Library, config: &ProjectConfig) -> Result<Report> {
    let jobs = library.jobs()?;
    let mut days: BTreeMap<String, DayBurn> = BTreeMap::new();
    let mut tiers: BTreeMap<String, TierTotals> = BTreeMap::new();
    for job in &jobs {
        let date = utc_date(job.created_at);
        days.entry(date.clone()).or_insert_with(|| DayBurn { date, burn: Burn::default() }).burn.add(job);
        let name = job.tier.clone().unwrap_or_else(|| format!("({})", job.kind));
        tiers
            .entry(name.clone())
            .or_insert_with(|| TierTotals { tier: name, burn: Burn::default() })
            .burn
            .add(job);
    }
    let count = |kind: &str| -> Result<usize> {
        Ok(library
            .list_assets(&super::assets::AssetFilter { kind: Some(kind.into()), ..Default::default() })?
            .len())
    };
    let drafts = count("draft")?;
    let finals = count("final")?;
    let total_credits: f64 = jobs.iter().map(|j| j.credits).sum();
    let total_device_seconds: f64 = jobs.iter().map(|j| j.device_seconds).sum();
    let policy = config.policy.drafts_per_final;
    let ratio = (finals > 0).then(|| drafts as f64 / finals as f64);
    let verdict = match ratio {
        None => "no finals yet".to_string(),
        // Within a quarter of the policy either way counts as on policy.
        Some(r) if (r - policy).abs() <= policy * 0.25 => "within policy".to_string(),
        Some(r) if r > policy => "more drafts per final than the policy".to_string(),
        Some(_) => "fewer drafts per final than the policy (finals rendered without exploring?)".to_string(),
    };
    Ok(Report {
        days: days.into_values().collect(),
        tiers: tiers.into_values().collect(),
        jobs: jobs.len(),
        total_credits,
        total_device_seconds,
        drafts,
        finals,
        drafts_per_final: ratio,
        policy_drafts_per_final: policy,
        policy_verdict: verdict,
        cost_per_delivered: (finals > 0).then(|| total_credits / finals as f64),
        budget_limit: config.budget.map(|b| b.limit),
        budget_left: config.budget.map(|b| b.limit - total_credits),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::library::Budget;

    #[test]
    fn budget_warns_then_refuses() {
        let cfg =
            ProjectConfig { budget: Some(Budget { limit: 10.0, warn_at: Some(5.0) }), ..Default::default() };
        assert!(matches!(check_budget(&cfg, 1.0, 1.0), Ok(None)));
        assert!(matches!(check_budget(&cfg, 4.5, 1.0), Ok(Some(_))));
        assert!(matches!(check_budget(&cfg, 9.5, 1.0), Err(Error::Budget(_))));
        assert!(matches!(check_budget(&cfg, 10.0, 0.0), Err(Error::Budget(_))));
        assert!(matches!(check_budget(&ProjectConfig::default(), 1e9, 1.0), Ok(None)));
    }
}
