//! What the daemon knows about traced processes (from /proc), beside the
//! event flow: the OpenTelemetry resource of each process.

pub mod kubernetes;
pub mod kubernetes_api;
pub mod process;
pub mod resolver;
pub mod tls_libraries;
pub mod tls_watch;
pub mod go_binary;
pub mod go_offsets;
pub mod go_programs;
