//! `periscope traces` as text: each trace as a time-aligned waterfall, one
//! line per span, in parent-tree order.

use std::borrow::Cow;
use std::collections::HashMap;

use super::model::{SpanView, TraceView, ViewKind};

/// Indentation stops growing past this depth (a runaway parent chain).
pub const MAX_DEPTH: usize = 32;

/// Shown before a span whose parent is not in the trace.
pub const DETACHED_MARKER: &str = "↳ ";

const SPAN_CELL: char = '█';
const IDLE_CELL: char = '·';
const DURATION_WIDTH: usize = 9;
/// Wider bars than this are taken as this wide (a bogus terminal size).
const MAX_BAR_WIDTH: usize = 1000;

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const CYAN: &str = "\x1b[36m";
const DIM: &str = "\x1b[2m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// One span in display order, with its place in the parent tree.
#[derive(Clone, Copy, Debug)]
pub struct SpanRow<'a> {
    pub span: &'a SpanView,
    /// Depth in the parent tree, capped at `MAX_DEPTH`.
    pub depth: usize,
    /// Shown as a root although it names a parent: the parent is not in
    /// the trace (or the parent links loop).
    pub detached: bool,
}

/// The time a trace covers: the earliest start to the latest end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeRange {
    pub start: u64,
    pub end: u64,
}

impl TimeRange {
    pub fn of(trace: &TraceView) -> TimeRange {
        let start = trace
            .spans
            .iter()
            .map(|s| s.start_unix_nano)
            .min()
            .unwrap_or(0);
        let end = trace.spans.iter().map(span_end).max().unwrap_or(start);
        TimeRange { start, end }
    }

    pub fn duration_ns(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// ns from the start of the range to `t`.
    pub fn offset_ns(&self, t: u64) -> u64 {
        t.saturating_sub(self.start)
    }
}

/// A span's end, never before its start.
pub fn span_end(span: &SpanView) -> u64 {
    span.end_unix_nano.max(span.start_unix_nano)
}

pub fn span_duration_ns(span: &SpanView) -> u64 {
    span.end_unix_nano.saturating_sub(span.start_unix_nano)
}

/// The span's label, or its name when the label is empty.
pub fn span_title(span: &SpanView) -> &str {
    if span.label.is_empty() {
        &span.name
    } else {
        &span.label
    }
}

/// The status column: the status text, with an `ERROR` marker in front
/// when the span failed.
pub fn status_text(span: &SpanView) -> String {
    match (span.error, span.status.is_empty()) {
        (true, true) => "ERROR".to_string(),
        (true, false) => format!("ERROR {}", printable(&span.status)),
        (false, _) => printable(&span.status).into_owned(),
    }
}

fn has_parent(span: &SpanView) -> bool {
    // An all-zero parent id is how some encoders write "no parent".
    span.parent_span_id
        .as_deref()
        .is_some_and(|p| !p.bytes().all(|b| b == b'0'))
}

/// The spans in display order: depth first, roots by start time, each
/// span's children by start time. Every span appears exactly once, whatever
/// its parent links say.
pub fn span_rows(trace: &TraceView) -> Vec<SpanRow<'_>> {
    let spans = &trace.spans;
    let tree = ParentTree::build(spans);
    let mut visited = vec![false; spans.len()];
    let mut rows = Vec::with_capacity(spans.len());
    for &root in &tree.roots {
        push_subtree(spans, &tree, root, &mut visited, &mut rows);
    }
    // Spans whose parent links loop never hang under a root: show each
    // loop from its earliest span.
    for i in by_start(spans, 0..spans.len()) {
        if !visited[i] {
            push_subtree(spans, &tree, i, &mut visited, &mut rows);
        }
    }
    rows
}

/// Indexes into the trace's spans: who is a root, who hangs under whom.
struct ParentTree {
    roots: Vec<usize>,
    children: Vec<Vec<usize>>,
}

impl ParentTree {
    fn build(spans: &[SpanView]) -> ParentTree {
        let mut index_by_id: HashMap<&str, usize> = HashMap::with_capacity(spans.len());
        for (i, span) in spans.iter().enumerate() {
            index_by_id.entry(span.span_id.as_str()).or_insert(i);
        }
        let mut roots = Vec::new();
        let mut children = vec![Vec::new(); spans.len()];
        for (i, span) in spans.iter().enumerate() {
            let parent = span.parent_span_id.as_deref().filter(|_| has_parent(span));
            match parent.and_then(|p| index_by_id.get(p)) {
                Some(&p) if p != i => children[p].push(i),
                _ => roots.push(i),
            }
        }
        let roots = by_start(spans, roots);
        let children = children.into_iter().map(|c| by_start(spans, c)).collect();
        ParentTree { roots, children }
    }
}

/// The indexes sorted by their span's start time, keeping the order the
/// spans were built in for equal starts.
fn by_start(spans: &[SpanView], indexes: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut sorted: Vec<usize> = indexes.into_iter().collect();
    sorted.sort_by_key(|&i| spans[i].start_unix_nano);
    sorted
}

/// Appends `root` and everything under it that is not shown yet. Iterative,
/// so a long parent chain cannot overflow the stack.
fn push_subtree<'a>(
    spans: &'a [SpanView],
    tree: &ParentTree,
    root: usize,
    visited: &mut [bool],
    rows: &mut Vec<SpanRow<'a>>,
) {
    let mut stack = vec![(root, 0usize)];
    while let Some((i, depth)) = stack.pop() {
        if std::mem::replace(&mut visited[i], true) {
            continue;
        }
        let span = &spans[i];
        rows.push(SpanRow {
            span,
            depth: depth.min(MAX_DEPTH),
            detached: depth == 0 && has_parent(span),
        });
        // Reversed so that the earliest child is popped first.
        for &child in tree.children[i].iter().rev() {
            if !visited[child] {
                stack.push((child, depth + 1));
            }
        }
    }
}

/// The trace as text: a header line, then one line per span with a bar of
/// `width` columns (1 to `MAX_BAR_WIDTH`) placing the span in the trace's time. Every line ends
/// with a newline. With `color`, ANSI colors; without, no escape codes.
pub fn render_trace(trace: &TraceView, width: usize, color: bool) -> String {
    let rows = span_rows(trace);
    let range = TimeRange::of(trace);
    let width = width.clamp(1, MAX_BAR_WIDTH);
    let status_width = rows
        .iter()
        .map(|r| status_text(r.span).chars().count())
        .max()
        .unwrap_or(0);
    let mut out = header_line(trace, &rows, range, color);
    for row in &rows {
        out.push_str(&span_line(row, range, width, status_width, color));
    }
    out
}

fn header_line(trace: &TraceView, rows: &[SpanRow], range: TimeRange, color: bool) -> String {
    let root = rows.first().map_or(Cow::Borrowed("(no spans)"), |r| {
        printable(span_title(r.span))
    });
    let errors = trace.spans.iter().filter(|s| s.error).count();
    let error_text = plural(errors, "error");
    let error_text = if errors > 0 {
        paint(&error_text, RED, color)
    } else {
        Cow::Borrowed(error_text.as_str())
    };
    format!(
        "{}  {}  {}  {}  {}\n",
        paint(
            &format!("trace {}", printable(&trace.trace_id)),
            BOLD,
            color
        ),
        root,
        format_duration(range.duration_ns()),
        plural(trace.spans.len(), "span"),
        error_text,
    )
}

/// `1 span`, `3 spans`.
pub fn plural(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

fn span_line(
    row: &SpanRow,
    range: TimeRange,
    width: usize,
    status_width: usize,
    color: bool,
) -> String {
    let span = row.span;
    let status = format!("{:<status_width$}", status_text(span));
    let status = if span.error {
        paint(&status, RED, color)
    } else {
        Cow::Owned(status)
    };
    let marker = if row.detached { DETACHED_MARKER } else { "" };
    let name = format!(
        "{}{}{} {}",
        "  ".repeat(row.depth),
        marker,
        printable(&span.service),
        printable(span_title(span))
    );
    let name = if span.kind == ViewKind::Internal {
        paint(&name, DIM, color)
    } else {
        Cow::Owned(name)
    };
    format!(
        "{} {:>DURATION_WIDTH$} {} {}\n",
        bar(span, range, width, color),
        format_duration(span_duration_ns(span)),
        status,
        name,
    )
}

/// `width` cells, the span's own painted solid.
fn bar(span: &SpanView, range: TimeRange, width: usize, color: bool) -> String {
    let (first, end) = bar_cells(span, range, width);
    let idle = |n: usize| IDLE_CELL.to_string().repeat(n);
    let solid = SPAN_CELL.to_string().repeat(end - first);
    format!(
        "{}{}{}",
        idle(first),
        paint(&solid, bar_color(span), color),
        idle(width - end)
    )
}

/// The cells `[first, end)` the span covers out of `width` (at least 1),
/// always at least one.
pub fn bar_cells(span: &SpanView, range: TimeRange, width: usize) -> (usize, usize) {
    let total = u128::from(range.duration_ns());
    let width = width.max(1) as u128;
    if total == 0 {
        return (0, 1);
    }
    let start = u128::from(range.offset_ns(span.start_unix_nano));
    let end = u128::from(range.offset_ns(span_end(span)));
    let first = (start * width / total).min(width - 1);
    let last = (end * width).div_ceil(total).clamp(first + 1, width);
    (first as usize, last as usize)
}

fn bar_color(span: &SpanView) -> &'static str {
    if span.error {
        return RED;
    }
    match span.kind {
        ViewKind::Client => CYAN,
        ViewKind::Server => GREEN,
        ViewKind::Internal => DIM,
    }
}

fn paint<'a>(text: &'a str, code: &str, color: bool) -> Cow<'a, str> {
    if color {
        Cow::Owned(format!("{code}{text}{RESET}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Text from the traced programs, with control characters (a terminal
/// escape sequence in an HTTP path, a newline) written as escapes.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A duration for people: `ns` below a microsecond, else µs, ms or s with
/// three significant digits (`950 ns`, `12.3 µs`, `1.50 s`).
pub fn format_duration(ns: u64) -> String {
    const UNITS: [&str; 3] = ["µs", "ms", "s"];
    if ns < 1_000 {
        return format!("{ns} ns");
    }
    let mut value = ns as f64 / 1e3;
    for (i, unit) in UNITS.iter().enumerate() {
        // 999.6 rounds to 1000: that is the next unit's 1.00.
        if value < 999.5 || i == UNITS.len() - 1 {
            return format!("{} {unit}", three_significant(value));
        }
        value /= 1e3;
    }
    unreachable!("the last unit always returns")
}

/// `value` with three significant digits (more for values of 1000 and
/// over, which keep all their integer digits).
pub fn three_significant(value: f64) -> String {
    let decimals = if value >= 99.95 {
        0
    } else if value >= 9.995 {
        1
    } else if value >= 0.9995 {
        2
    } else {
        3
    };
    format!("{value:.decimals$}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const T0: u64 = 1_700_000_000_000_000_000;

    pub(crate) fn span(
        id: &str,
        parent: Option<&str>,
        label: &str,
        kind: ViewKind,
        start_ms: u64,
        end_ms: u64,
    ) -> SpanView {
        SpanView {
            span_id: id.to_string(),
            parent_span_id: parent.map(str::to_string),
            name: label.split(' ').next().unwrap_or_default().to_string(),
            label: label.to_string(),
            service: "frontend".to_string(),
            pid: 42,
            kind,
            start_unix_nano: T0 + start_ms * MS,
            end_unix_nano: T0 + end_ms * MS,
            status: String::new(),
            error: false,
        }
    }

    /// A server span, its client call with two phases, and a span whose
    /// parent is elsewhere; built out of order.
    pub(crate) fn three_level_trace() -> TraceView {
        let mut orphan = span(
            "00000000000000e1",
            Some("00000000000000ff"),
            "GET /elsewhere",
            ViewKind::Server,
            60,
            100,
        );
        orphan.error = true;
        orphan.status = "500".to_string();
        let mut client = span(
            "00000000000000c1",
            Some("00000000000000a1"),
            "GET backend/items",
            ViewKind::Client,
            10,
            50,
        );
        client.status = "200".to_string();
        let mut root = span(
            "00000000000000a1",
            None,
            "GET /api/items",
            ViewKind::Server,
            0,
            80,
        );
        root.status = "200".to_string();
        TraceView {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".to_string(),
            updated_seq: 7,
            spans: vec![
                span(
                    "00000000000000d2",
                    Some("00000000000000c1"),
                    "server",
                    ViewKind::Internal,
                    20,
                    45,
                ),
                orphan,
                client,
                span(
                    "00000000000000d1",
                    Some("00000000000000c1"),
                    "connect",
                    ViewKind::Internal,
                    10,
                    20,
                ),
                root,
            ],
        }
    }

    fn labels_and_depths(trace: &TraceView) -> Vec<(String, usize, bool)> {
        span_rows(trace)
            .iter()
            .map(|r| (r.span.label.clone(), r.depth, r.detached))
            .collect()
    }

    fn bar_of(line: &str, width: usize) -> String {
        line.chars().take(width).collect()
    }

    #[test]
    fn rows_are_depth_first_with_children_by_start() {
        let rows = labels_and_depths(&three_level_trace());
        let expected = [
            ("GET /api/items", 0, false),
            ("GET backend/items", 1, false),
            ("connect", 2, false),
            ("server", 2, false),
            ("GET /elsewhere", 0, true),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(l, d, o)| (l.to_string(), *d, *o))
            .collect();
        assert_eq!(rows, expected);
    }

    #[test]
    fn text_indents_by_depth_and_marks_orphans() {
        let text = render_trace(&three_level_trace(), 40, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(
            lines[0].starts_with(
                "trace 4bf92f3577b34da6a3ce929d0e0e4736  GET /api/items  100 ms  5 spans  1 error"
            ),
            "{text}"
        );
        assert!(lines[1].ends_with(" frontend GET /api/items"), "{text}");
        assert!(
            lines[2].ends_with("   frontend GET backend/items"),
            "{text}"
        );
        assert!(lines[3].ends_with("     frontend connect"), "{text}");
        assert!(lines[5].contains("ERROR 500"), "{text}");
        assert!(lines[5].ends_with(" ↳ frontend GET /elsewhere"), "{text}");
    }

    #[test]
    fn bars_are_placed_by_time() {
        let width = 40;
        let text = render_trace(&three_level_trace(), width, false);
        let lines: Vec<&str> = text.lines().collect();
        let root_bar = bar_of(lines[1], width);
        assert_eq!(
            root_bar.chars().filter(|&c| c == SPAN_CELL).count(),
            32,
            "{root_bar}"
        );
        // The orphan runs from 60 to 100 ms of 100: the second half.
        let orphan_bar = bar_of(lines[5], width);
        let first = orphan_bar.chars().position(|c| c == SPAN_CELL).unwrap();
        assert!(first >= width / 2, "{orphan_bar}");
        assert!(orphan_bar.ends_with(SPAN_CELL), "{orphan_bar}");
        assert_eq!(orphan_bar.chars().count(), width);
    }

    #[test]
    fn every_span_gets_at_least_one_cell() {
        let mut trace = three_level_trace();
        trace.spans.push(span(
            "00000000000000f1",
            Some("00000000000000a1"),
            "tiny",
            ViewKind::Client,
            99,
            99,
        ));
        let range = TimeRange::of(&trace);
        for s in &trace.spans {
            let (first, end) = bar_cells(s, range, 10);
            assert!(first < end && end <= 10, "{}: {first}..{end}", s.label);
        }
    }

    #[test]
    fn no_escape_codes_without_color() {
        let mut trace = three_level_trace();
        trace.spans[0].label = "GET /\x1b[31mred\x1b[0m".to_string();
        let plain = render_trace(&trace, 30, false);
        assert!(!plain.contains('\x1b'), "{plain:?}");
        assert!(plain.contains("\\u{1b}[31mred"), "{plain:?}");
        let colored = render_trace(&trace, 30, true);
        assert!(colored.contains(&format!("{RED}ERROR 500")), "{colored:?}");
        assert!(colored.contains(GREEN) && colored.contains(CYAN) && colored.contains(DIM));
    }

    #[test]
    fn zero_duration_trace() {
        let trace = TraceView {
            trace_id: "00".to_string(),
            updated_seq: 1,
            spans: vec![
                span("01", None, "a", ViewKind::Server, 5, 5),
                span("02", Some("01"), "b", ViewKind::Client, 5, 5),
            ],
        };
        let text = render_trace(&trace, 8, false);
        assert!(text.contains("0 ns"), "{text}");
        for line in text.lines().skip(1) {
            assert_eq!(bar_of(line, 8), "█·······", "{text}");
        }
    }

    #[test]
    fn odd_input_does_not_panic() {
        let empty = TraceView {
            trace_id: String::new(),
            updated_seq: 0,
            spans: vec![],
        };
        assert_eq!(render_trace(&empty, 0, true).lines().count(), 1);
        // End before start, a width of zero, a self-parent.
        let backwards = TraceView {
            trace_id: "01".to_string(),
            updated_seq: 0,
            spans: vec![
                span("01", Some("01"), "x", ViewKind::Client, 9, 3),
                span("02", None, "y", ViewKind::Server, 0, 1),
            ],
        };
        let text = render_trace(&backwards, 0, false);
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.contains("↳ frontend x"), "{text}");
        let wide = render_trace(&backwards, usize::MAX, false);
        let bar_cells = |line: &str| {
            line.chars()
                .take_while(|&c| c == SPAN_CELL || c == IDLE_CELL)
                .count()
        };
        assert!(
            wide.lines()
                .skip(1)
                .all(|line| bar_cells(line) == MAX_BAR_WIDTH)
        );
    }

    #[test]
    fn parent_cycles_show_every_span_once() {
        let trace = TraceView {
            trace_id: "01".to_string(),
            updated_seq: 0,
            spans: vec![
                span("0b", Some("0a"), "b", ViewKind::Client, 2, 3),
                span("0a", Some("0b"), "a", ViewKind::Server, 1, 4),
            ],
        };
        let rows = labels_and_depths(&trace);
        assert_eq!(
            rows,
            vec![("a".to_string(), 0, true), ("b".to_string(), 1, false)]
        );
    }

    #[test]
    fn deep_chains_are_capped() {
        let ids: Vec<String> = (0..200).map(|i| format!("{i:016x}")).collect();
        let spans = (0..200)
            .map(|i| {
                let parent = if i == 0 {
                    None
                } else {
                    Some(ids[i - 1].as_str())
                };
                span(&ids[i], parent, "deep", ViewKind::Internal, i as u64, 400)
            })
            .collect();
        let trace = TraceView {
            trace_id: "01".to_string(),
            updated_seq: 0,
            spans,
        };
        let rows = span_rows(&trace);
        assert_eq!(rows.len(), 200);
        assert_eq!(rows.iter().map(|r| r.depth).max(), Some(MAX_DEPTH));
        assert_eq!(rows[199].depth, MAX_DEPTH);
    }

    #[test]
    fn durations_have_three_significant_digits() {
        let cases = [
            (0, "0 ns"),
            (999, "999 ns"),
            (1_000, "1.00 µs"),
            (12_345, "12.3 µs"),
            (999_600, "1.00 ms"),
            (100 * MS, "100 ms"),
            (1_500 * MS, "1.50 s"),
            (123_456 * MS, "123 s"),
            (7_200_000 * MS, "7200 s"),
        ];
        for (ns, text) in cases {
            assert_eq!(format_duration(ns), text, "{ns}");
        }
        assert!(format_duration(u64::MAX).ends_with(" s"));
    }
}
