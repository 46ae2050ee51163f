//! Steering a running daemon: the root-only control socket (server side),
//! the `periscope status|enable|disable|filter|sample|traces|map` client, the
//! optional Prometheus endpoint and the `--config` file.
//!
//! The wire protocol is documented in [`protocol`].

pub mod client;
pub mod daemon;
pub mod config_file;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod views;

#[allow(unused_imports)] // conveniences for the daemon; which ones it needs varies
pub use protocol::{Feature, Filter, Request, Response, StatusReport};
#[allow(unused_imports)]
pub use server::{ControlCall, ControlServer};

/// Where the daemon listens and the client connects unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/periscope/control.sock";
