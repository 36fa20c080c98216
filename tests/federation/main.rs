//! Whole federations in one test binary: real QUIC with mutual TLS on 127.0.0.1, and
//! `cohort-sim` scenarios on the bundled MNIST. One binary, not one per file: each linked the
//! whole stack again (140 MB apiece, most of a clean build's disk, and a link each).
//!
//! The tests that capture the process's log with a global subscriber (`census`, `hostile`,
//! `log_escaping`) stay binaries of their own: a process has one subscriber.
//!
//! Run one module with `cargo test --test federation secure::`.

#[path = "../support/mod.rs"]
mod support;

mod duplicate_daemon;
mod federated_eval;
mod federation_end;
mod fleet;
mod loopback;
mod metrics;
mod personal;
mod privacy;
mod renewal;
mod revocation;
mod runs;
mod scenarios;
mod secure;
