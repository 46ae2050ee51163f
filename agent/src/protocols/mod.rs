//! Protocol parsers: bytes in, messages out. No I/O, no BPF, fuzzable.

// Not all of the DNS API is used by the pipeline yet (drop the allow once it is).
#[allow(dead_code)]
pub mod dns;
pub mod http1;
pub mod tls_records;
