//! Protocol parsers: bytes in, messages out. No I/O, no BPF, fuzzable.

pub mod dns;
pub mod exchange;
pub mod http1;
pub mod tls_records;
