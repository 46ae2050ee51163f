//! RED metrics (rate, errors, duration) computed from every request span,
//! before sampling: the aggregator, and encoders for OTLP histograms and the
//! Prometheus / OpenMetrics text exposition.

pub mod aggregator;
#[cfg(test)]
mod bench;
pub mod otlp;
pub mod prometheus;
pub mod routes;
pub mod snapshot;

use snapshot::{DURATION_BOUNDS_S, Exemplar, Series};

/// Buckets per series: one per bound and one above the last bound.
const BUCKETS: usize = DURATION_BOUNDS_S.len() + 1;

/// The series' bucket counts, exactly `BUCKETS` long: missing buckets count
/// 0, extra ones are ignored.
fn bucket_counts(series: &Series) -> [u64; BUCKETS] {
    let mut counts = [0; BUCKETS];
    for (slot, count) in counts.iter_mut().zip(&series.bucket_counts) {
        *slot = *count;
    }
    counts
}

/// The exemplar's trace and span ids as bytes, or None unless both are hex
/// of the right length (16 and 8 bytes).
fn exemplar_ids(exemplar: &Exemplar) -> Option<([u8; 16], [u8; 8])> {
    Some((
        decode_hex(&exemplar.trace_id)?,
        decode_hex(&exemplar.span_id)?,
    ))
}

fn decode_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    let digits = hex.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut bytes = [0; N];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = hex_value(pair[0])? << 4 | hex_value(pair[1])?;
    }
    Some(bytes)
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|v| v as u8)
}
