//! # tektree-tools
//!
//! What the two tools of this crate share; the tools are its binaries: `tektree-bench` (the
//! benchmark, `docs/performance.md`) and `tektree-faults` (the fault harness,
//! `docs/reliability.md`). Neither is part of the production build (`cargo build -p
//! tektree-services` builds the `tektree` binary alone).

#![deny(missing_docs)]

/// Which bus a run or a scenario uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    /// Redis Streams.
    Redis,
    /// NATS JetStream.
    Nats,
}

impl BusKind {
    /// `redis` or `nats`: its name on the command line and in the JSON lines.
    pub fn name(self) -> &'static str {
        match self {
            BusKind::Redis => "redis",
            BusKind::Nats => "nats",
        }
    }
}
