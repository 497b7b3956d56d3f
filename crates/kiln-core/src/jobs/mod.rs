//! The job layer: one typed spec per job kind, one engine that runs any of them (budget, drift
//! guard, model load from a shared pool, run, atomic write, library record with lineage, replay
//! record), one event stream with cancellation, and the durable queue the server schedules.
//! The CLI and the server only translate arguments or requests into [`spec::JobSpec`]s and
//! print or serialise the [`engine::JobOutput`].
//!
//! - [`spec`]: the job specs (serde), kinds and lanes; [`spec_checks`]: their validation, the
//!   remote-request checks and the input images they name;
//! - [`engine`]: the runner and the typed result;
//! - [`generate`], [`edit`]: the generate and inpaint/erase/outpaint jobs;
//! - [`preset`]: a job's preset (brand kit) applied to its spec, its images and their records;
//! - [`events`]: job events, the sink trait, latent previews;
//! - [`pool`]: loaded models shared by jobs, LRU within a memory budget;
//! - [`queue`]: the durable queue in the project library (lanes, round-robin, leases, budget
//!   reservations, crash recovery);
//! - [`worker`]: the queue worker (leases and heartbeats, draft preemption, draining) that
//!   `kiln serve` runs in-process and `kiln worker` runs anywhere;
//! - [`workers`]: worker advertisements, events relayed between processes, shared image bytes;
//! - [`keys`]: API keys (hashed) and their quotas.

pub mod edit;
pub mod engine;
pub mod events;
pub mod generate;
pub mod keys;
pub mod pool;
pub mod preset;
pub mod queue;
pub mod spec;
pub mod spec_checks;
pub mod worker;
pub mod workers;

pub use engine::{Engine, JobOutput, OutputImage, RunContext};
pub use events::{EventSink, JobEvent, NullSink};
pub use spec::{JobKind, JobSpec, Lane};
