//! `periscope map` as text: one line per caller -> callee edge.

use std::time::Duration;

use super::model::{MapEdge, ServiceMap};
use super::waterfall::{printable, three_significant};

/// Error rates from this percentage up are shown as failing (red).
pub const FAILING_ERROR_PERCENT: f64 = 5.0;

const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";
const COLUMNS: [&str; 6] = ["CALL", "REQUESTS", "RATE/S", "ERR%", "P50", "P99"];
const ERROR_COLUMN: usize = 3;

/// The map as a table sorted by caller then callee, under a header line
/// naming the window. Every line ends with a newline. With `color`, error
/// rates of `FAILING_ERROR_PERCENT` and over are red.
pub fn render_map(map: &ServiceMap, color: bool) -> String {
    let mut out = format!(
        "service map over the last {}\n",
        format_window(map.window_s)
    );
    if map.edges.is_empty() {
        out.push_str("no calls seen yet\n");
        return out;
    }
    let edges = sorted_edges(map);
    let cells: Vec<[String; 6]> = edges.iter().map(|e| edge_cells(e)).collect();
    let widths = column_widths(&cells);
    out.push_str(&table_line(&COLUMNS.map(str::to_string), &widths, false));
    for (edge, row) in edges.iter().zip(&cells) {
        let failing = color && error_percent(edge) >= FAILING_ERROR_PERCENT;
        out.push_str(&table_line(row, &widths, failing));
    }
    out
}

/// The edges by caller, then callee.
pub fn sorted_edges(map: &ServiceMap) -> Vec<&MapEdge> {
    let mut edges: Vec<&MapEdge> = map.edges.iter().collect();
    edges.sort_by(|a, b| (&a.caller, &a.callee).cmp(&(&b.caller, &b.callee)));
    edges
}

/// Failed requests out of all, in percent; 0 when there were none.
pub fn error_percent(edge: &MapEdge) -> f64 {
    percent(edge.errors, edge.requests)
}

pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// `N req, X.X/s, E% err, p50 Y ms, p99 Z ms`.
pub fn edge_summary(edge: &MapEdge) -> String {
    format!(
        "{} req, {}/s, {:.1}% err, p50 {}, p99 {}",
        edge.requests,
        format_rate(edge.rate_per_s),
        error_percent(edge),
        format_ms(edge.p50_ms),
        format_ms(edge.p99_ms),
    )
}

/// Milliseconds with three significant digits (`0.512 ms`, `12.3 ms`);
/// `-` for a value that is not a duration (negative, NaN).
pub fn format_ms(ms: f64) -> String {
    if ms.is_finite() && ms >= 0.0 {
        format!("{} ms", three_significant(ms))
    } else {
        "-".to_string()
    }
}

pub fn format_rate(per_s: f64) -> String {
    if per_s.is_finite() && per_s >= 0.0 {
        format!("{per_s:.1}")
    } else {
        "-".to_string()
    }
}

/// Whole seconds, as `1h 2m 3s`.
pub fn format_window(window_s: f64) -> String {
    // `as` saturates: NaN and negatives become 0.
    let seconds = window_s as u64;
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

fn edge_cells(edge: &MapEdge) -> [String; 6] {
    [
        format!("{} -> {}", printable(&edge.caller), printable(&edge.callee)),
        edge.requests.to_string(),
        format_rate(edge.rate_per_s),
        format!("{:.1}%", error_percent(edge)),
        format_ms(edge.p50_ms),
        format_ms(edge.p99_ms),
    ]
}

fn column_widths(rows: &[[String; 6]]) -> [usize; 6] {
    let mut widths = COLUMNS.map(|c| c.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths
}

/// The first column left-aligned, the numbers right-aligned; the error
/// column red when `failing`.
fn table_line(cells: &[String; 6], widths: &[usize; 6], failing: bool) -> String {
    let mut line = String::new();
    for (i, (cell, &width)) in cells.iter().zip(widths).enumerate() {
        let padded = if i == 0 {
            format!("{cell:<width$}")
        } else {
            format!("  {cell:>width$}")
        };
        if failing && i == ERROR_COLUMN {
            line.push_str(RED);
            line.push_str(&padded);
            line.push_str(RESET);
        } else {
            line.push_str(&padded);
        }
    }
    line.truncate(line.trim_end().len());
    line.push('\n');
    line
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn edge(caller: &str, callee: &str, requests: u64, errors: u64) -> MapEdge {
        MapEdge {
            caller: caller.to_string(),
            callee: callee.to_string(),
            requests,
            errors,
            rate_per_s: requests as f64 / 60.0,
            p50_ms: 1.234,
            p99_ms: 56.78,
        }
    }

    #[test]
    fn one_sorted_line_per_edge() {
        let map = ServiceMap {
            window_s: 3723.5,
            edges: vec![
                edge("web", "db", 10, 0),
                edge("api", "web", 600, 6),
                edge("api", "cache", 5, 0),
            ],
        };
        let text = render_map(&map, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "service map over the last 1h 2m 3s");
        assert!(lines[1].starts_with("CALL "), "{text}");
        assert!(lines[2].starts_with("api -> cache "), "{text}");
        assert!(lines[3].starts_with("api -> web "), "{text}");
        assert!(lines[4].starts_with("web -> db "), "{text}");
        assert_eq!(lines.len(), 5);
        let api_web: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            api_web,
            [
                "api", "->", "web", "600", "10.0", "1.0%", "1.23", "ms", "56.8", "ms"
            ]
        );
    }

    #[test]
    fn empty_map() {
        let text = render_map(&ServiceMap::default(), true);
        assert_eq!(text, "service map over the last 0s\nno calls seen yet\n");
    }

    #[test]
    fn failing_edges_are_red_only_with_color() {
        let map = ServiceMap {
            window_s: 60.0,
            edges: vec![edge("a", "b", 100, 5), edge("a", "c", 100, 4)],
        };
        let colored = render_map(&map, true);
        let lines: Vec<&str> = colored.lines().collect();
        assert!(
            lines[2].contains(RED) && lines[2].contains(&format!(" 5.0%{RESET}")),
            "{colored:?}"
        );
        assert!(!lines[3].contains('\x1b'), "{colored:?}");
        assert!(!render_map(&map, false).contains('\x1b'));
    }

    #[test]
    fn summaries_and_odd_numbers() {
        let mut e = edge("a", "b", 3, 1);
        e.rate_per_s = 0.05;
        assert_eq!(
            edge_summary(&e),
            "3 req, 0.1/s, 33.3% err, p50 1.23 ms, p99 56.8 ms"
        );
        e.requests = 0;
        e.rate_per_s = f64::NAN;
        e.p50_ms = -1.0;
        e.p99_ms = f64::INFINITY;
        assert_eq!(edge_summary(&e), "0 req, -/s, 0.0% err, p50 -, p99 -");
        assert_eq!(format_ms(0.0123), "0.012 ms");
        assert_eq!(format_window(f64::NAN), "0s");
        assert_eq!(format_window(-5.0), "0s");
        let _ = format_window(f64::INFINITY);
    }
}
