//! `loadgen`: everything that puts load on the system under test and
//! nothing that observes it. The origin server (`hvprof origin`), the load
//! generator (`hvprof load`), the real-HAProxy driver, and the seed's size
//! sweep (`hvprof bench`). Knows nothing of probes.

pub mod cli;
pub mod client;
pub mod haproxy;
pub mod http1;
pub mod origin;
pub mod reach;
pub mod size;
pub mod stats;
pub mod sweep;
pub mod target;
