//! The local view as standalone SVG files: recent traces as waterfalls and
//! the service map. Text is measured as a monospace font's advance, which
//! is close enough to keep labels inside their columns.

use std::borrow::Cow;
use std::fmt::Write as _;

use super::map_view::{FAILING_ERROR_PERCENT, edge_summary, error_percent, format_window, percent};
use super::model::{MapEdge, ServiceMap, SpanView, TraceView, ViewKind};
use super::waterfall::{self, DETACHED_MARKER, SpanRow, TimeRange, format_duration, plural};

const FONT_FAMILY: &str = "ui-monospace, Menlo, Consolas, monospace";
const FONT_SIZE: f64 = 12.0;
/// The advance of one character at `FONT_SIZE`, to fit text in a column.
const CHAR_WIDTH: f64 = 7.2;
const MARGIN: f64 = 16.0;
const BOLD: &str = r#"font-weight="bold""#;

// Traces: labels on the left, then the bars, then duration and status.
const TRACES_WIDTH: f64 = 1280.0;
const LABEL_WIDTH: f64 = 380.0;
const BAR_X: f64 = MARGIN + LABEL_WIDTH;
const BAR_WIDTH: f64 = 680.0;
const DURATION_X: f64 = BAR_X + BAR_WIDTH + 10.0;
const MIN_BAR_WIDTH: f64 = 1.0;
const ROW_HEIGHT: f64 = 18.0;
const HEADING_HEIGHT: f64 = 24.0;
const AXIS_HEIGHT: f64 = 24.0;
const TRACE_GAP: f64 = 20.0;
const INDENT: f64 = 12.0;

// Service map: one column per call depth.
const BOX_WIDTH: f64 = 180.0;
const BOX_HEIGHT: f64 = 40.0;
const COLUMN_GAP: f64 = 380.0;
const ROW_GAP: f64 = 60.0;
/// Height of the loop drawn for a service calling itself.
const LOOP_HEIGHT: f64 = 36.0;
/// How far below the boxes a call back to an earlier column dips.
const BACK_EDGE_DROP: f64 = 50.0;
const MAP_TOP: f64 = MARGIN + 30.0 + LOOP_HEIGHT + 20.0;
const MAP_MIN_WIDTH: f64 = 640.0;
const LABEL_FONT_SIZE: f64 = 10.0;
const LABEL_CHAR_WIDTH: f64 = 6.0;
/// How many lines an edge label may be moved down to clear the others.
const MAX_LABEL_NUDGES: usize = 30;

/// Escapes `&`, `<`, `>`, `"` and `'`, and replaces the characters XML 1.0
/// cannot carry at all (most control characters) with U+FFFD.
pub fn escape_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if is_xml_char(c) => out.push(c),
            _ => out.push('\u{FFFD}'),
        }
    }
    out
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

fn document(width: f64, height: f64, title: &str, defs: &str, body: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{h:.0}\" \
         viewBox=\"0 0 {w:.0} {h:.0}\" font-family=\"{FONT_FAMILY}\" font-size=\"{FONT_SIZE}\">\n\
         <title>{title}</title>\n\
         {defs}\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n\
         {body}\
         </svg>\n",
        w = width.ceil(),
        h = height.ceil(),
        title = escape_xml(title),
    )
}

/// `<text>` at (x, y) with `attrs` written as they are.
fn push_text(out: &mut String, x: f64, y: f64, text: &str, attrs: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" {attrs}>{}</text>"#,
        escape_xml(text)
    );
}

fn push_line(out: &mut String, (x1, y1): (f64, f64), (x2, y2): (f64, f64), stroke: &str) {
    let _ = writeln!(
        out,
        r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{stroke}"/>"#
    );
}

/// `text` cut to `max_chars`, with an ellipsis when cut.
fn fit(text: &str, max_chars: usize) -> Cow<'_, str> {
    if text.chars().count() <= max_chars {
        return Cow::Borrowed(text);
    }
    let mut cut: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    cut.push('…');
    Cow::Owned(cut)
}

/// The traces stacked vertically, each as a waterfall with its own time
/// axis, rows in the same order as the text view.
pub fn traces_svg(traces: &[TraceView]) -> String {
    let mut body = String::new();
    let mut y = MARGIN;
    if traces.is_empty() {
        push_text(&mut body, MARGIN, y + FONT_SIZE, "no traces yet", "");
        y += ROW_HEIGHT;
    }
    for trace in traces {
        y = push_trace(&mut body, trace, y) + TRACE_GAP;
    }
    let title = format!("Periscope: {}", plural(traces.len(), "recent trace"));
    document(TRACES_WIDTH, y + MARGIN, &title, "", &body)
}

/// Draws one trace from `top` down; returns the y where it ends.
fn push_trace(out: &mut String, trace: &TraceView, top: f64) -> f64 {
    let rows = waterfall::span_rows(trace);
    let range = TimeRange::of(trace);
    push_trace_heading(out, trace, range, top);
    let rows_top = top + HEADING_HEIGHT + AXIS_HEIGHT;
    let rows_bottom = rows_top + rows.len() as f64 * ROW_HEIGHT;
    push_time_axis(out, range, rows_top, rows_bottom);
    for (i, row) in rows.iter().enumerate() {
        push_span_row(out, row, range, rows_top + i as f64 * ROW_HEIGHT);
    }
    rows_bottom
}

fn push_trace_heading(out: &mut String, trace: &TraceView, range: TimeRange, top: f64) {
    let errors = trace.spans.iter().filter(|s| s.error).count();
    let heading = format!(
        "trace {}  {}  {}, {}",
        trace.trace_id,
        format_duration(range.duration_ns()),
        plural(trace.spans.len(), "span"),
        plural(errors, "error"),
    );
    push_text(out, MARGIN, top + 16.0, &heading, BOLD);
}

/// The axis above the bars, with a tick, a label and a faint grid line
/// through the rows at each round number of milliseconds.
fn push_time_axis(out: &mut String, range: TimeRange, rows_top: f64, rows_bottom: f64) {
    const AXIS_COLOR: &str = "#9e9e9e";
    let axis_y = rows_top - 4.0;
    push_line(
        out,
        (BAR_X, axis_y),
        (BAR_X + BAR_WIDTH, axis_y),
        AXIS_COLOR,
    );
    let total_ms = range.duration_ns() as f64 / 1e6;
    let step = tick_step(total_ms);
    for tick in axis_ticks(total_ms, step) {
        let x = if total_ms > 0.0 {
            BAR_X + tick / total_ms * BAR_WIDTH
        } else {
            BAR_X
        };
        push_line(out, (x, axis_y), (x, rows_bottom), "#eeeeee");
        push_line(out, (x, axis_y - 5.0), (x, axis_y), AXIS_COLOR);
        let attrs = r##"text-anchor="middle" font-size="10" fill="#616161""##;
        push_text(out, x, axis_y - 8.0, &tick_label(tick, step), attrs);
    }
}

/// A round step (1, 2 or 5 times a power of ten) giving about five ticks.
fn tick_step(total_ms: f64) -> f64 {
    if !(total_ms.is_finite() && total_ms > 0.0) {
        return 1.0;
    }
    let rough = total_ms / 5.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let nice = match rough / magnitude {
        f if f <= 1.0 => 1.0,
        f if f <= 2.0 => 2.0,
        f if f <= 5.0 => 5.0,
        _ => 10.0,
    };
    nice * magnitude
}

fn axis_ticks(total_ms: f64, step: f64) -> Vec<f64> {
    if !(total_ms.is_finite() && total_ms > 0.0 && step > 0.0) {
        return vec![0.0];
    }
    // The step gives at most ten; the cap guards against rounding surprises.
    let count = (total_ms / step + 1e-9).floor().min(20.0) as usize;
    (0..=count).map(|i| i as f64 * step).collect()
}

fn tick_label(tick: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).clamp(0.0, 9.0) as usize;
    format!("{tick:.decimals$} ms")
}

fn push_span_row(out: &mut String, row: &SpanRow, range: TimeRange, top: f64) {
    let span = row.span;
    let baseline = top + ROW_HEIGHT - 5.0;
    let indent = (row.depth as f64 * INDENT).min(LABEL_WIDTH / 2.0);
    let marker = if row.detached { DETACHED_MARKER } else { "" };
    let label = format!("{marker}{} {}", span.service, waterfall::span_title(span));
    let room = ((LABEL_WIDTH - indent - 8.0) / CHAR_WIDTH).max(1.0) as usize;
    push_text(
        out,
        MARGIN + indent,
        baseline,
        &fit(&label, room),
        text_color(span),
    );

    let (x, width) = bar_geometry(span, range);
    let duration = format_duration(waterfall::span_duration_ns(span));
    let status = waterfall::status_text(span);
    let tooltip = format!("{label}: {duration} {status}");
    let _ = writeln!(
        out,
        r#"<rect x="{x:.2}" y="{:.1}" width="{width:.2}" height="{:.1}" rx="2" fill="{}"><title>{}</title></rect>"#,
        top + 3.0,
        ROW_HEIGHT - 6.0,
        bar_fill(span),
        escape_xml(&tooltip),
    );
    push_text(
        out,
        DURATION_X,
        baseline,
        format!("{duration} {status}").trim_end(),
        text_color(span),
    );
}

/// Where the span's bar starts and how wide it is; at least `MIN_BAR_WIDTH`
/// and never past the end of the axis.
fn bar_geometry(span: &SpanView, range: TimeRange) -> (f64, f64) {
    let total = range.duration_ns();
    if total == 0 {
        return (BAR_X, MIN_BAR_WIDTH);
    }
    let scale = BAR_WIDTH / total as f64;
    let x = BAR_X + range.offset_ns(span.start_unix_nano) as f64 * scale;
    let x = x.min(BAR_X + BAR_WIDTH - MIN_BAR_WIDTH);
    let width = (waterfall::span_duration_ns(span) as f64 * scale).max(MIN_BAR_WIDTH);
    (x, width.min(BAR_X + BAR_WIDTH - x))
}

/// Servers green, clients blue, phases (internal spans) lighter, errors red.
fn bar_fill(span: &SpanView) -> &'static str {
    match (span.error, span.kind) {
        (true, ViewKind::Internal) => "#ef9a9a",
        (true, _) => "#d32f2f",
        (false, ViewKind::Server) => "#43a047",
        (false, ViewKind::Client) => "#039be5",
        (false, ViewKind::Internal) => "#b0bec5",
    }
}

fn text_color(span: &SpanView) -> &'static str {
    match (span.error, span.kind) {
        (true, _) => r##"fill="#c62828""##,
        (false, ViewKind::Internal) => r##"fill="#757575""##,
        (false, _) => r##"fill="#212121""##,
    }
}

/// How a service fares as a callee, from the calls into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    /// Nobody calls it (as far as this node saw).
    Uncalled,
    Healthy,
    Degraded,
    Failing,
}

impl Health {
    fn of(service: &str, edges: &[MapEdge]) -> Health {
        let incoming: Vec<&MapEdge> = edges.iter().filter(|e| e.callee == service).collect();
        if incoming.is_empty() {
            return Health::Uncalled;
        }
        let requests = incoming
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.requests));
        let errors = incoming
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.errors));
        match percent(errors, requests) {
            p if p >= FAILING_ERROR_PERCENT => Health::Failing,
            p if p > 0.0 => Health::Degraded,
            _ => Health::Healthy,
        }
    }

    /// (fill, stroke)
    fn colors(self) -> (&'static str, &'static str) {
        match self {
            Health::Uncalled => ("#eeeeee", "#757575"),
            Health::Healthy => ("#c8e6c9", "#2e7d32"),
            Health::Degraded => ("#ffe082", "#ff8f00"),
            Health::Failing => ("#ffcdd2", "#c62828"),
        }
    }
}

/// A service's box on the map.
struct MapNode<'a> {
    name: &'a str,
    column: usize,
    x: f64,
    y: f64,
}

/// Where an edge is drawn and where its label would best go.
struct EdgeRoute {
    path: String,
    label_at: (f64, f64),
}

/// An edge's label where it is drawn.
struct EdgeLabel {
    text: String,
    failing: bool,
    area: Area,
}

/// A rectangle of the drawing, to keep labels apart.
#[derive(Clone, Copy, Debug)]
struct Area {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
}

impl Area {
    fn overlaps(&self, other: &Area) -> bool {
        self.left < other.right
            && other.left < self.right
            && self.top < other.bottom
            && other.top < self.bottom
    }

    /// The area a label with its baseline centred on `(x, y)` covers, moved
    /// right if it would stick out on the left.
    fn of_label(text: &str, (x, y): (f64, f64)) -> Area {
        let half = text.chars().count() as f64 * LABEL_CHAR_WIDTH / 2.0;
        let x = x.max(MARGIN + half);
        Area {
            left: x - half,
            top: y - LABEL_FONT_SIZE,
            right: x + half,
            bottom: y + 3.0,
        }
    }

    fn of_node(node: &MapNode) -> Area {
        Area {
            left: node.x,
            top: node.y,
            right: node.x + BOX_WIDTH,
            bottom: node.y + BOX_HEIGHT,
        }
    }

    fn moved_down(self, by: f64) -> Area {
        Area {
            top: self.top + by,
            bottom: self.bottom + by,
            ..self
        }
    }
}

const ARROW_MARKERS: &str = concat!(
    "<defs>\n",
    r##"<marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#616161"/></marker>"##,
    "\n",
    r##"<marker id="arrow-failing" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#c62828"/></marker>"##,
    "\n</defs>\n",
);

/// The service map: a box per service, in columns by call depth from the
/// services nobody calls, filled by the error rate of the calls into it;
/// an arrow per edge labelled with its numbers.
pub fn map_svg(map: &ServiceMap) -> String {
    let names = service_names(map);
    let heading = format!(
        "service map over the last {}: {}, {}",
        format_window(map.window_s),
        plural(names.len(), "service"),
        plural(map.edges.len(), "edge"),
    );
    let mut body = String::new();
    push_text(&mut body, MARGIN, MARGIN + FONT_SIZE, &heading, BOLD);
    if map.edges.is_empty() {
        push_text(
            &mut body,
            MARGIN,
            MARGIN + FONT_SIZE + 24.0,
            "no calls seen yet",
            "",
        );
        return document(
            MAP_MIN_WIDTH,
            MARGIN * 2.0 + 48.0,
            "Periscope service map",
            "",
            &body,
        );
    }
    let ends = edge_ends(&names, &map.edges);
    let nodes = place_nodes(&names, &ends);
    let routes: Vec<(&MapEdge, EdgeRoute)> = ends
        .iter()
        .map(|&(edge, from, to)| (edge, edge_route(&nodes[from], &nodes[to])))
        .collect();
    let labels = place_labels(&nodes, &routes);
    // Lines first, boxes over them, labels over everything.
    for (edge, route) in &routes {
        push_edge_path(&mut body, edge, route);
    }
    for node in &nodes {
        push_node(&mut body, node, Health::of(node.name, &map.edges));
    }
    for label in &labels {
        push_edge_label(&mut body, label);
    }
    let (width, height) = map_size(&nodes, &labels);
    document(width, height, "Periscope service map", ARROW_MARKERS, &body)
}

/// Every service that calls or is called, sorted.
fn service_names(map: &ServiceMap) -> Vec<&str> {
    let mut names: Vec<&str> = map
        .edges
        .iter()
        .flat_map(|e| [e.caller.as_str(), e.callee.as_str()])
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Each edge with the indexes of its caller and callee in `names`.
fn edge_ends<'a>(names: &[&str], edges: &'a [MapEdge]) -> Vec<(&'a MapEdge, usize, usize)> {
    edges
        .iter()
        .filter_map(|e| {
            let from = names.binary_search(&e.caller.as_str()).ok()?;
            let to = names.binary_search(&e.callee.as_str()).ok()?;
            Some((e, from, to))
        })
        .collect()
}

fn place_nodes<'a>(names: &[&'a str], ends: &[(&MapEdge, usize, usize)]) -> Vec<MapNode<'a>> {
    let calls: Vec<(usize, usize)> = ends.iter().map(|&(_, from, to)| (from, to)).collect();
    let columns = node_columns(names.len(), &calls);
    let mut rows_used = vec![0usize; names.len()];
    names
        .iter()
        .zip(columns)
        .map(|(&name, column)| {
            let row = rows_used[column];
            rows_used[column] += 1;
            MapNode {
                name,
                column,
                x: MARGIN + column as f64 * (BOX_WIDTH + COLUMN_GAP),
                y: MAP_TOP + row as f64 * (BOX_HEIGHT + ROW_GAP),
            }
        })
        .collect()
}

/// Each node's column: the longest chain of calls leading to it from the
/// services nobody calls. Calls that close a loop are left out of the
/// layering, so a loop cannot push columns on without end.
fn node_columns(node_count: usize, calls: &[(usize, usize)]) -> Vec<usize> {
    let mut callees = vec![Vec::new(); node_count];
    let mut called = vec![false; node_count];
    for &(from, to) in calls {
        if from != to && !callees[from].contains(&to) {
            callees[from].push(to);
            called[to] = true;
        }
    }
    // Start from the services nobody calls; then from the rest, for loops
    // that nothing outside them calls.
    let starts = (0..node_count).filter(|&i| !called[i]).chain(0..node_count);
    let layered = calls_without_loops(&callees, starts);
    longest_path_depths(node_count, &layered)
}

/// The calls a depth-first walk from `starts` takes or crosses, without the
/// ones that lead back to a service still being walked (they close loops).
fn calls_without_loops(
    callees: &[Vec<usize>],
    starts: impl Iterator<Item = usize>,
) -> Vec<(usize, usize)> {
    #[derive(Clone, Copy, PartialEq)]
    enum Walk {
        NotSeen,
        Open,
        Done,
    }
    let mut walk = vec![Walk::NotSeen; callees.len()];
    let mut kept = Vec::new();
    for start in starts {
        if walk[start] != Walk::NotSeen {
            continue;
        }
        walk[start] = Walk::Open;
        let mut stack = vec![(start, 0usize)];
        while let Some(top) = stack.last_mut() {
            let node = top.0;
            let Some(&next) = callees[node].get(top.1) else {
                walk[node] = Walk::Done;
                stack.pop();
                continue;
            };
            top.1 += 1;
            match walk[next] {
                Walk::Open => {}
                Walk::Done => kept.push((node, next)),
                Walk::NotSeen => {
                    kept.push((node, next));
                    walk[next] = Walk::Open;
                    stack.push((next, 0));
                }
            }
        }
    }
    kept
}

/// Longest path from a node without incoming calls, over calls that form
/// no loop (Kahn's order: each node is settled once).
fn longest_path_depths(node_count: usize, calls: &[(usize, usize)]) -> Vec<usize> {
    let mut waiting_for = vec![0usize; node_count];
    let mut callees = vec![Vec::new(); node_count];
    for &(from, to) in calls {
        callees[from].push(to);
        waiting_for[to] += 1;
    }
    let mut depth = vec![0usize; node_count];
    let mut ready: Vec<usize> = (0..node_count).filter(|&i| waiting_for[i] == 0).collect();
    while let Some(node) = ready.pop() {
        for &next in &callees[node] {
            depth[next] = depth[next].max(depth[node] + 1);
            waiting_for[next] -= 1;
            if waiting_for[next] == 0 {
                ready.push(next);
            }
        }
    }
    depth
}

/// A call to a later column goes right to left across the gap; a call
/// back (or within a column) dips under the boxes; a self-call loops above.
fn edge_route(from: &MapNode, to: &MapNode) -> EdgeRoute {
    let (p0, p1, p2, p3) = if from.name == to.name {
        let (left, right) = (from.x + BOX_WIDTH * 0.35, from.x + BOX_WIDTH * 0.65);
        let top = from.y - LOOP_HEIGHT;
        (
            (right, from.y),
            (right + 24.0, top),
            (left - 24.0, top),
            (left, from.y),
        )
    } else if to.column > from.column {
        let start = (from.x + BOX_WIDTH, from.y + BOX_HEIGHT / 2.0);
        let end = (to.x, to.y + BOX_HEIGHT / 2.0);
        let bend = (end.0 - start.0) / 2.0;
        (start, (start.0 + bend, start.1), (end.0 - bend, end.1), end)
    } else {
        let start = (from.x + BOX_WIDTH * 0.6, from.y + BOX_HEIGHT);
        let end = (to.x + BOX_WIDTH * 0.4, to.y + BOX_HEIGHT);
        let bottom = start.1.max(end.1) + BACK_EDGE_DROP;
        (start, (start.0, bottom), (end.0, bottom), end)
    };
    let path = format!(
        "M{:.1},{:.1} C{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}",
        p0.0, p0.1, p1.0, p1.1, p2.0, p2.1, p3.0, p3.1
    );
    // The curve's midpoint (t = 1/2): the label goes just above it, or
    // below it for calls dipping under the boxes.
    let mid = |a: f64, b: f64, c: f64, d: f64| (a + 3.0 * b + 3.0 * c + d) / 8.0;
    let (x, y) = (mid(p0.0, p1.0, p2.0, p3.0), mid(p0.1, p1.1, p2.1, p3.1));
    let below = to.column <= from.column && from.name != to.name;
    let label_at = (
        x,
        if below {
            y + LABEL_FONT_SIZE + 4.0
        } else {
            y - 4.0
        },
    );
    EdgeRoute { path, label_at }
}

fn is_failing(edge: &MapEdge) -> bool {
    error_percent(edge) >= FAILING_ERROR_PERCENT
}

fn push_edge_path(out: &mut String, edge: &MapEdge, route: &EdgeRoute) {
    let (stroke, marker) = if is_failing(edge) {
        ("#c62828", "arrow-failing")
    } else {
        ("#616161", "arrow")
    };
    let _ = writeln!(
        out,
        r#"<path d="{}" fill="none" stroke="{stroke}" stroke-width="1.5" marker-end="url(#{marker})"><title>{}</title></path>"#,
        route.path,
        escape_xml(&format!(
            "{} -> {}: {}",
            edge.caller,
            edge.callee,
            edge_summary(edge)
        )),
    );
}

/// Each edge's label at its route's spot, moved down a line at a time
/// while it covers a box or an earlier label (up to a limit).
fn place_labels(nodes: &[MapNode], routes: &[(&MapEdge, EdgeRoute)]) -> Vec<EdgeLabel> {
    let mut taken: Vec<Area> = nodes.iter().map(Area::of_node).collect();
    let mut labels = Vec::with_capacity(routes.len());
    for (edge, route) in routes {
        let text = edge_summary(edge);
        let mut area = Area::of_label(&text, route.label_at);
        for _ in 0..MAX_LABEL_NUDGES {
            if !taken.iter().any(|t| t.overlaps(&area)) {
                break;
            }
            area = area.moved_down(LABEL_FONT_SIZE + 3.0);
        }
        taken.push(area);
        labels.push(EdgeLabel {
            text,
            failing: is_failing(edge),
            area,
        });
    }
    labels
}

fn push_edge_label(out: &mut String, label: &EdgeLabel) {
    let fill = if label.failing { "#c62828" } else { "#424242" };
    // A white outline keeps the text readable over lines.
    let attrs = format!(
        r##"text-anchor="middle" font-size="{LABEL_FONT_SIZE}" fill="{fill}" stroke="#ffffff" stroke-width="3" paint-order="stroke""##
    );
    let x = (label.area.left + label.area.right) / 2.0;
    push_text(out, x, label.area.bottom - 3.0, &label.text, &attrs);
}

fn push_node(out: &mut String, node: &MapNode, health: Health) {
    let (fill, stroke) = health.colors();
    let _ = writeln!(
        out,
        r#"<g class="node"><title>{}</title><rect x="{:.1}" y="{:.1}" width="{BOX_WIDTH}" height="{BOX_HEIGHT}" rx="6" fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>"#,
        escape_xml(node.name),
        node.x,
        node.y,
    );
    let room = ((BOX_WIDTH - 12.0) / CHAR_WIDTH) as usize;
    let center = (
        node.x + BOX_WIDTH / 2.0,
        node.y + BOX_HEIGHT / 2.0 + FONT_SIZE / 3.0,
    );
    push_text(
        out,
        center.0,
        center.1,
        &fit(node.name, room),
        r#"text-anchor="middle""#,
    );
    out.push_str("</g>\n");
}

/// Room for every box, label, and the calls dipping below the boxes.
fn map_size(nodes: &[MapNode], labels: &[EdgeLabel]) -> (f64, f64) {
    let areas = nodes
        .iter()
        .map(Area::of_node)
        .chain(labels.iter().map(|l| l.area));
    let (right, bottom) = areas.fold((0.0, MAP_TOP), |(r, b), a| {
        (a.right.max(r), a.bottom.max(b))
    });
    let node_bottom = nodes
        .iter()
        .map(|n| n.y + BOX_HEIGHT)
        .fold(MAP_TOP, f64::max);
    let bottom = bottom.max(node_bottom + BACK_EDGE_DROP);
    ((right + MARGIN).max(MAP_MIN_WIDTH), bottom + MARGIN)
}

#[cfg(test)]
mod tests {
    use super::super::map_view::tests::edge;
    use super::super::waterfall::tests::{span, three_level_trace};
    use super::*;

    fn texts(doc: &roxmltree::Document) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(str::to_string)
            .collect()
    }

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("{e}\n{svg}"))
    }

    #[test]
    fn traces_svg_is_xml_with_every_span() {
        let traces = [three_level_trace(), three_level_trace()];
        let svg = traces_svg(&traces);
        let doc = parse(&svg);
        let root = doc.root_element();
        assert_eq!(
            root.tag_name().namespace(),
            Some("http://www.w3.org/2000/svg")
        );
        assert!(root.attribute("width").is_some() && root.attribute("height").is_some());
        assert!(root.children().any(|n| n.has_tag_name("title")));
        let texts = texts(&doc);
        for s in &traces[0].spans {
            assert!(
                texts
                    .iter()
                    .any(|t| t.ends_with(&format!("frontend {}", s.label))),
                "{}",
                s.label
            );
        }
        let heading = "trace 4bf92f3577b34da6a3ce929d0e0e4736  100 ms  5 spans, 1 error";
        assert_eq!(texts.iter().filter(|t| *t == heading).count(), 2);
        assert!(
            texts.iter().any(|t| t == "0 ms") && texts.iter().any(|t| t == "100 ms"),
            "{texts:?}"
        );
        assert!(texts.iter().any(|t| t == "↳ frontend GET /elsewhere"));
        let bars = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect") && n.attribute("rx") == Some("2"))
            .count();
        assert_eq!(bars, 10);
    }

    #[test]
    fn rows_follow_the_text_order() {
        let svg = traces_svg(&[three_level_trace()]);
        let doc = parse(&svg);
        let texts = texts(&doc);
        let labels = [
            "GET /api/items",
            "GET backend/items",
            "connect",
            "server",
            "GET /elsewhere",
        ];
        let positions: Vec<usize> = labels
            .iter()
            .map(|l| {
                texts
                    .iter()
                    .position(|t| t.ends_with(&format!("frontend {l}")))
                    .unwrap()
            })
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    }

    #[test]
    fn bars_are_placed_by_time() {
        let trace = three_level_trace();
        let range = TimeRange::of(&trace);
        let orphan = trace
            .spans
            .iter()
            .find(|s| s.label == "GET /elsewhere")
            .unwrap();
        let (x, width) = bar_geometry(orphan, range);
        assert!((x - (BAR_X + 0.6 * BAR_WIDTH)).abs() < 0.01, "{x}");
        assert!((width - 0.4 * BAR_WIDTH).abs() < 0.01, "{width}");
    }

    #[test]
    fn text_is_escaped() {
        let mut trace = three_level_trace();
        trace.spans[0].label = r#"<&>"' x"#.to_string();
        trace.spans[1].service = "bell\u{7}".to_string();
        let svg = traces_svg(&[trace]);
        assert!(svg.contains("&lt;&amp;&gt;&quot;&apos; x"), "{svg}");
        let doc = parse(&svg);
        assert!(texts(&doc).iter().any(|t| t.ends_with(r#"<&>"' x"#)));
        assert!(texts(&doc).iter().any(|t| t.starts_with("↳ bell\u{FFFD} ")));
        assert_eq!(
            escape_xml("a&b<c>d\"e'f"),
            "a&amp;b&lt;c&gt;d&quot;e&apos;f"
        );
    }

    #[test]
    fn degenerate_traces() {
        let empty = TraceView {
            trace_id: "e".to_string(),
            updated_seq: 0,
            spans: vec![],
        };
        let zero = TraceView {
            trace_id: "z".to_string(),
            updated_seq: 0,
            spans: vec![
                span("01", None, "a", ViewKind::Server, 3, 3),
                span("02", Some("01"), "b", ViewKind::Client, 3, 3),
            ],
        };
        let backwards = TraceView {
            trace_id: "b".to_string(),
            updated_seq: 0,
            spans: vec![span("01", Some("01"), "a", ViewKind::Server, 9, 2)],
        };
        parse(&traces_svg(&[]));
        let svg = traces_svg(&[empty, zero, backwards]);
        let doc = parse(&svg);
        assert!(!svg.contains("NaN"), "{svg}");
        assert!(texts(&doc).iter().any(|t| t == "0 ms"));
        assert_eq!(tick_label(0.0, tick_step(0.0)), "0 ms");
        assert_eq!(axis_ticks(0.0, tick_step(0.0)), vec![0.0]);
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(100.0), 20.0);
        assert_eq!(tick_step(7.0), 2.0);
        assert_eq!(axis_ticks(7.0, 2.0), vec![0.0, 2.0, 4.0, 6.0]);
        assert_eq!(tick_label(0.5, tick_step(2.3)), "0.5 ms");
        assert_eq!(tick_label(0.05, tick_step(0.23)), "0.05 ms");
    }

    fn node_fill<'a>(doc: &'a roxmltree::Document, name: &str) -> &'a str {
        let node = doc
            .descendants()
            .find(|n| {
                n.attribute("class") == Some("node")
                    && n.children()
                        .any(|c| c.has_tag_name("text") && c.text() == Some(name))
            })
            .unwrap_or_else(|| panic!("no node {name}"));
        node.children()
            .find(|c| c.has_tag_name("rect"))
            .and_then(|r| r.attribute("fill"))
            .unwrap()
    }

    fn sample_map() -> ServiceMap {
        ServiceMap {
            window_s: 60.0,
            edges: vec![
                edge("frontend", "api", 1000, 0),
                edge("api", "db", 1000, 10),
                edge("api", "cache", 100, 50),
                edge("frontend", "db", 10, 0),
            ],
        }
    }

    #[test]
    fn map_has_nodes_edges_and_labels() {
        let svg = map_svg(&sample_map());
        let doc = parse(&svg);
        let texts = texts(&doc);
        for name in ["frontend", "api", "db", "cache"] {
            assert!(texts.iter().any(|t| t == name), "{name}");
        }
        let arrows = doc
            .descendants()
            .filter(|n| n.has_tag_name("path") && n.attribute("marker-end").is_some())
            .count();
        assert_eq!(arrows, 4);
        assert!(doc.descendants().any(|n| n.has_tag_name("marker")));
        assert!(
            texts
                .iter()
                .any(|t| t == "1000 req, 16.7/s, 1.0% err, p50 1.23 ms, p99 56.8 ms"),
            "{texts:?}"
        );
        assert!(
            doc.root_element()
                .children()
                .any(|n| n.has_tag_name("title"))
        );
    }

    #[test]
    fn nodes_are_coloured_by_errors_into_them() {
        let svg = map_svg(&sample_map());
        let doc = parse(&svg);
        assert_eq!(node_fill(&doc, "frontend"), Health::Uncalled.colors().0);
        assert_eq!(node_fill(&doc, "api"), Health::Healthy.colors().0);
        // 10 errors in 1010 calls from two callers: under 5%.
        assert_eq!(node_fill(&doc, "db"), Health::Degraded.colors().0);
        assert_eq!(node_fill(&doc, "cache"), Health::Failing.colors().0);
    }

    #[test]
    fn columns_follow_call_depth() {
        let map = sample_map();
        let names = service_names(&map);
        let ends = edge_ends(&names, &map.edges);
        let nodes = place_nodes(&names, &ends);
        let column = |name: &str| nodes.iter().find(|n| n.name == name).unwrap().column;
        assert_eq!(
            [
                column("frontend"),
                column("api"),
                column("db"),
                column("cache")
            ],
            [0, 1, 2, 2]
        );
    }

    #[test]
    fn cycles_terminate() {
        let loop_map = ServiceMap {
            window_s: 1.0,
            edges: vec![edge("a", "b", 1, 0), edge("b", "a", 1, 1)],
        };
        let doc_text = map_svg(&loop_map);
        let doc = parse(&doc_text);
        assert_eq!(node_fill(&doc, "a"), Health::Failing.colors().0);
        assert_eq!(node_fill(&doc, "b"), Health::Healthy.colors().0);

        let self_call = ServiceMap {
            window_s: 1.0,
            edges: vec![edge("a", "a", 1, 0)],
        };
        parse(&map_svg(&self_call));

        // A loop entered from outside, and a longer one.
        let calls = [(0, 1), (1, 2), (2, 1), (2, 3), (3, 4), (4, 2)];
        assert_eq!(node_columns(5, &calls), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn empty_map() {
        let svg = map_svg(&ServiceMap::default());
        let doc = parse(&svg);
        assert!(texts(&doc).iter().any(|t| t == "no calls seen yet"));
    }
}
