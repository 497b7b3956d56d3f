//! The server's shared state (one `Arc`): the engine, the live event hub, its queue worker and the limits every request is checked against.

use crate::error::{ApiError, ApiResult};
use crate::hub::EventHub;
use kiln_core::jobs::queue::Queue;
use kiln_core::jobs::spec::{JobSpec, Lane};
use kiln_core::jobs::worker::{Worker, WorkerOptions};
use kiln_core::jobs::Engine;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Request limits, checked before anything is decoded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body in bytes.
    pub body_bytes: usize,
    /// Largest side of an uploaded image in pixels.
    pub image_side: u32,
    /// Largest generated side in pixels.
    pub generate_side: usize,
}

/// Which web origins may call the server from a browser (none unless configured).
#[derive(Debug, Clone, Default)]
pub struct Cors {
    pub origins: Vec<String>,
}

impl Cors {
    /// The origins as header values, each checked to be an origin as browsers send it:
    /// `http` or `https`, `://`, a host (letters, digits, `.`, `-`, or a bracketed IPv6
    /// address) and an optional port; nothing else (no path, no spaces, no wildcard).
    pub fn header_values(&self) -> Result<Vec<axum::http::HeaderValue>, crate::ServeError> {
        self.origins
            .iter()
            .map(|o| {
                let bad = || crate::ServeError::BadOrigin(o.clone());
                let rest =
                    o.strip_prefix("https://").or_else(|| o.strip_prefix("http://")).ok_or_else(bad)?;
                let (host, port) = match rest.strip_prefix('[') {
                    // [IPv6]:port
                    Some(v6) => {
                        let (addr, after) = v6.split_once(']').ok_or_else(bad)?;
                        let port = if after.is_empty() {
                            None
                        } else {
                            Some(after.strip_prefix(':').ok_or_else(bad)?)
                        };
                        let ok = !addr.is_empty()
                            && addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.');
                        (if ok { "v6" } else { "" }, port)
                    }
                    None => match rest.split_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (rest, None),
                    },
                };
                let host_ok = !host.is_empty()
                    && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
                let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
                if !host_ok || !port_ok {
                    return Err(bad());
                }
                axum::http::HeaderValue::from_str(o).map_err(|_| bad())
            })
            .collect()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self { body_bytes: 32 * 1024 * 1024, image_side: 4096, generate_side: 2048 }
    }
}

/// Shared by every handler and the worker.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub hub: Arc<EventHub>,
    /// The queue workers of this process (publishing into `hub`): the engine's own, then one
    /// per further device (`--devices`); none with `--no-worker`.
    pub workers: Vec<Arc<Worker>>,
    pub shutting_down: AtomicBool,
    /// A1111's `sd_model_checkpoint`: the tier its txt2img/img2img use.
    pub a1111_tier: Mutex<String>,
    pub limits: Limits,
}

/// Who made a request: an API key's name, or "local" when the project has no keys.
#[derive(Debug, Clone)]
pub struct Owner(pub String);

impl AppState {
    pub fn new(engine: Arc<Engine>, limits: Limits, workers: Vec<(Arc<Engine>, WorkerOptions)>) -> Self {
        let hub = Arc::new(EventHub::default());
        let workers = workers.into_iter().map(|(e, o)| Worker::new(e, hub.clone(), o)).collect();
        Self {
            engine,
            hub,
            workers,
            shutting_down: AtomicBool::new(false),
            a1111_tier: Mutex::new("draft".into()),
            limits,
        }
    }

    pub fn queue(&self) -> ApiResult<Queue> {
        Ok(Queue::open(&self.engine.project)?)
    }

    pub fn notify_worker(&self) {
        self.workers.iter().for_each(|w| w.notify());
    }

    /// The lane a spec waits in: drafts (the draft job, and generations on a draft-lane tier)
    /// before everything else.
    pub fn lane(&self, spec: &JobSpec) -> ApiResult<Lane> {
        let tiers = self.engine.project.tiers()?;
        Ok(match spec {
            // Cutouts take about a second: interactive work, like drafts.
            JobSpec::Draft(_) | JobSpec::Cutout(_) => Lane::Draft,
            JobSpec::Generate(_) | JobSpec::Inpaint(_) => {
                match kiln_core::jobs::preset::effective_tier(&self.engine.project, spec)?.as_deref() {
                    Some(t) if tiers.get(t)?.is_draft() => Lane::Draft,
                    _ => Lane::Final,
                }
            }
            _ => Lane::Final,
        })
    }

    /// Validates and queues a remote spec for `owner`: remote checks, the tier, the size
    /// limits, the owner's daily quota and the project budget (reserved atomically).
    pub fn submit(&self, spec: &JobSpec, owner: &Owner, quota: Option<f64>) -> ApiResult<i64> {
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::Unavailable("the server is shutting down; retry on its successor".into()));
        }
        spec.check_remote()?;
        self.check_refs(spec)?;
        if let JobSpec::Generate(g) = spec {
            for (field, v) in [("width", g.width), ("height", g.height)] {
                if let Some(v) = v.filter(|v| *v > self.limits.generate_side) {
                    return Err(ApiError::bad(format!(
                        "invalid {field}: {v} exceeds the server's {} px limit; generate smaller and upscale",
                        self.limits.generate_side
                    )));
                }
            }
        }
        let tiers = self.engine.project.tiers()?;
        // Credits to reserve, and the memory a worker needs for the tier's model (placement).
        let (estimate, need_bytes) =
            match kiln_core::jobs::preset::effective_tier(&self.engine.project, spec)?.as_deref() {
                Some(name) => {
                    let tier = tiers.get(name)?;
                    let library = self.engine.project.library()?;
                    (
                        kiln_core::library::ledger::estimate(&library, tier, spec.images())?,
                        tier.weights_on_disk(),
                    )
                }
                None => (0.0, 0),
            };
        let lane = self.lane(spec)?;
        let mut queue = self.queue()?;
        if let Some(q) = quota {
            let since = now() - 86_400.0;
            let used = queue.owner_credits_since(&owner.0, since)?;
            if used + estimate > q + 1e-9 {
                return Err(kiln_core::Error::Quota {
                    msg: format!(
                        "key `{}` used {used:.4} of its {q:.4} credits in the last 24 h; this job needs about {estimate:.4}",
                        owner.0
                    ),
                    retry_after_seconds: 3600,
                }
                .into());
            }
        }
        let limit = self.engine.project.config.budget.map(|b| b.limit);
        let id = queue.enqueue_placed(spec, &owner.0, lane, estimate, limit, need_bytes)?;
        let position = queue.get(id)?.position.unwrap_or(0);
        self.hub.publish(id, kiln_core::jobs::JobEvent::Queued { position });
        self.notify_worker();
        Ok(id)
    }
}

impl AppState {
    /// Every asset and upload the spec names exists (so a bad id fails now, not in the queue).
    fn check_refs(&self, spec: &JobSpec) -> ApiResult<()> {
        let refs = spec.image_refs();
        if refs.is_empty() {
            return Ok(());
        }
        let ws = self.engine.workspace()?;
        for (field, r) in refs {
            kiln_core::jobs::engine::image_path(&ws, r, field).map_err(|e| match e {
                kiln_core::Error::InvalidArgument { .. } | kiln_core::Error::UnknownId { .. } => {
                    ApiError::bad(format!("{field}: {e}"))
                }
                other => ApiError::from(other),
            })?;
        }
        Ok(())
    }
}

pub use kiln_core::library::now_seconds as now;

#[cfg(test)]
mod tests {
    use super::Cors;

    #[test]
    fn only_real_origins_are_accepted() {
        let check = |o: &str| Cors { origins: vec![o.to_string()] }.header_values().is_ok();
        for good in [
            "https://studio.example",
            "http://localhost:5173",
            "http://[::1]:8080",
            "http://[::1]",
            "http://10.0.0.2",
        ] {
            assert!(check(good), "{good}");
        }
        for bad in [
            "not a url",
            "studio.example",
            "https://",
            "https://a b",
            "https://x/path",
            "https://x:0",
            "https://x:99999",
            "*",
            "ftp://x",
            "http://[zz]",
        ] {
            assert!(!check(bad), "{bad}");
        }
    }
}
