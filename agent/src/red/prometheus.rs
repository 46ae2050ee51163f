//! RED snapshots in the Prometheus text exposition format (0.0.4) and in
//! OpenMetrics 1.0 text, which adds units and exemplars. Names follow the
//! OpenTelemetry-to-Prometheus rules: `http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`.

use std::fmt::Write;

use super::snapshot::{
    DURATION_BOUNDS_S, Exemplar, PointResource, PointValue, RedMetric, RedSnapshot, Series,
};
use super::{BUCKETS, bucket_counts, exemplar_ids};

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The resource attributes that become labels, with their label names.
const RESOURCE_LABELS: [(&str, &str); 6] = [
    ("service.name", "service_name"),
    ("process.pid", "process_pid"),
    ("k8s.namespace.name", "k8s_namespace_name"),
    ("k8s.pod.name", "k8s_pod_name"),
    ("k8s.container.name", "k8s_container_name"),
    ("container.id", "container_id"),
];

/// Whether an Accept header lists OpenMetrics text with a q above 0.
pub fn wants_openmetrics(accept_header: &str) -> bool {
    let accept: String = accept_header
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    accept.split(',').any(|media_range| {
        let mut parts = media_range.split(';');
        parts.next() == Some("application/openmetrics-text")
            && parts.all(|param| !is_zero_quality(param))
    })
}

/// An unreadable q counts as 0: the text format is the safe choice.
fn is_zero_quality(param: &str) -> bool {
    param
        .strip_prefix("q=")
        .is_some_and(|q| !q.parse::<f64>().is_ok_and(|q| q > 0.0))
}

/// Appends the exposition of every RED metric with series, one block per
/// metric.
pub fn render(snapshot: &RedSnapshot, openmetrics: bool, out: &mut String) {
    for metric in RedMetric::ALL {
        let mut family = snapshot
            .series
            .iter()
            .filter(|s| s.metric == metric)
            .filter_map(|s| Some((s, snapshot.resources.get(s.resource)?)))
            .peekable();
        if family.peek().is_none() {
            continue;
        }
        let name = metric_name(metric);
        write_metadata(&name, metric.description(), openmetrics, out);
        for (series, resource) in family {
            write_series(&name, series, resource, openmetrics, out);
        }
    }
    if openmetrics {
        out.push_str("# EOF\n");
    }
}

fn metric_name(metric: RedMetric) -> String {
    format!("{}_seconds", sanitize(metric.name()))
}

fn write_metadata(name: &str, help: &str, openmetrics: bool, out: &mut String) {
    if openmetrics {
        // The order OpenMetrics recommends.
        let _ = writeln!(out, "# TYPE {name} histogram\n# UNIT {name} seconds");
        let _ = write!(out, "# HELP {name} ");
        write_escaped(help, true, out);
    } else {
        let _ = write!(out, "# HELP {name} ");
        // The text format's HELP escapes only backslash and newline.
        write_escaped(help, false, out);
        let _ = write!(out, "\n# TYPE {name} histogram");
    }
    out.push('\n');
}

fn write_series(
    name: &str,
    series: &Series,
    resource: &PointResource,
    openmetrics: bool,
    out: &mut String,
) {
    let labels = labels(resource, series);
    let exemplars = if openmetrics {
        bucket_exemplars(series)
    } else {
        [None; BUCKETS]
    };
    let mut cumulative: u64 = 0;
    for (bucket, count) in bucket_counts(series).into_iter().enumerate() {
        // Capped so that a snapshot whose buckets add up to more than its
        // count still gives monotonic buckets ending at the count.
        cumulative = cumulative.saturating_add(count).min(series.count);
        let (le, value) = match DURATION_BOUNDS_S.get(bucket) {
            Some(bound) => (le(*bound, openmetrics), cumulative),
            None => ("+Inf".to_string(), series.count),
        };
        write_sample_name(name, "_bucket", &labels, Some(&le), out);
        let _ = write!(out, " {value}");
        if let Some(exemplar) = exemplars[bucket] {
            write_exemplar(exemplar, out);
        }
        out.push('\n');
    }
    write_sample_name(name, "_sum", &labels, None, out);
    let _ = writeln!(out, " {}", float(histogram_sum(series.sum)));
    write_sample_name(name, "_count", &labels, None, out);
    let _ = writeln!(out, " {}", series.count);
}

fn write_sample_name(name: &str, suffix: &str, labels: &str, le: Option<&str>, out: &mut String) {
    let _ = match (labels.is_empty(), le) {
        (true, None) => write!(out, "{name}{suffix}"),
        (false, None) => write!(out, "{name}{suffix}{{{labels}}}"),
        (true, Some(le)) => write!(out, "{name}{suffix}{{le=\"{le}\"}}"),
        (false, Some(le)) => write!(out, "{name}{suffix}{{{labels},le=\"{le}\"}}"),
    };
}

/// `name="value",...`: the resource's labels, then the point's attributes.
/// A name seen already, and `le` (the bucket label), are left out: either
/// would make the line invalid.
fn labels(resource: &PointResource, series: &Series) -> String {
    let resource_labels = RESOURCE_LABELS.iter().filter_map(|(key, label)| {
        let (_, value) = resource.attributes.iter().find(|(k, _)| k == key)?;
        Some((label.to_string(), value))
    });
    let point_labels = series
        .attributes
        .iter()
        .map(|(key, value)| (label_name(key), value));
    let mut names: Vec<String> = Vec::new();
    let mut out = String::new();
    for (name, value) in resource_labels.chain(point_labels) {
        if name.is_empty() || name == "le" || names.contains(&name) {
            continue;
        }
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"");
        match value {
            PointValue::Str(s) => write_escaped(s, true, &mut out),
            PointValue::Int(i) => {
                let _ = write!(out, "{i}");
            }
        }
        out.push('"');
        names.push(name);
    }
    out
}

/// An attribute key as a label name: invalid characters become `_`; a
/// leading digit, or the `__` Prometheus reserves, gets a `key` prefix.
fn label_name(key: &str) -> String {
    let name = sanitize(key);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        format!("key_{name}")
    } else if name.starts_with("__") {
        format!("key{name}")
    } else {
        name
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn write_escaped(text: &str, escape_quotes: bool, out: &mut String) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if escape_quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// At most one exemplar per bucket (the latest), and only those with valid
/// ids.
fn bucket_exemplars(series: &Series) -> [Option<&Exemplar>; BUCKETS] {
    let mut chosen: [Option<&Exemplar>; BUCKETS] = [None; BUCKETS];
    for (bucket, exemplar) in &series.exemplars {
        let Some(slot) = chosen.get_mut(*bucket) else {
            continue;
        };
        let newer = slot.is_none_or(|kept| exemplar.time_unix_nano > kept.time_unix_nano);
        if newer && exemplar_ids(exemplar).is_some() {
            *slot = Some(exemplar);
        }
    }
    chosen
}

fn write_exemplar(exemplar: &Exemplar, out: &mut String) {
    let seconds = exemplar.time_unix_nano / 1_000_000_000;
    let nanos = exemplar.time_unix_nano % 1_000_000_000;
    let _ = write!(
        out,
        " # {{trace_id=\"{}\",span_id=\"{}\"}} {} {seconds}.{nanos:09}",
        exemplar.trace_id,
        exemplar.span_id,
        float(exemplar.value)
    );
}

/// A bucket bound the way Prometheus' Go clients print it: "0.005", "1",
/// "10" (Rust's shortest form equals Go's %g for these bounds), with the
/// ".0" OpenMetrics' canonical form adds to whole numbers ("1.0").
fn le(bound: f64, openmetrics: bool) -> String {
    let text = bound.to_string();
    if openmetrics && !text.contains(['.', 'e']) {
        text + ".0"
    } else {
        text
    }
}

/// A histogram's sum must not be NaN or negative.
fn histogram_sum(sum: f64) -> f64 {
    if sum.is_finite() && sum > 0.0 {
        sum
    } else {
        0.0
    }
}

/// A float as Prometheus and OpenMetrics parse it: shortest round-trip
/// digits, always with a decimal point or an exponent.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE_HEX: &str = "0af7651916cd43dd8448eb211c80319c";
    const SPAN_HEX: &str = "b7ad6b7169203331";

    fn series(id: u64, resource: usize, bucket_counts: Vec<u64>) -> Series {
        let count = bucket_counts.iter().sum();
        Series {
            id,
            metric: RedMetric::HttpServer,
            resource,
            attributes: vec![("http.route".into(), PointValue::Str("/cart".into()))],
            start_unix_nano: 10,
            count,
            sum: 1.5,
            min: 0.001,
            max: 12.0,
            bucket_counts,
            exemplars: Vec::new(),
        }
    }

    fn resource(service: &str, pid: i64) -> PointResource {
        PointResource {
            attributes: vec![
                ("service.name".into(), PointValue::Str(service.into())),
                ("process.pid".into(), PointValue::Int(pid)),
                ("host.name".into(), PointValue::Str("node-1".into())),
            ],
        }
    }

    fn snapshot(series: Vec<Series>) -> RedSnapshot {
        RedSnapshot {
            time_unix_nano: 100,
            enabled: true,
            resources: vec![resource("shop", 42)],
            series,
            ..Default::default()
        }
    }

    fn rendered(snapshot: &RedSnapshot, openmetrics: bool) -> String {
        let mut out = String::new();
        render(snapshot, openmetrics, &mut out);
        out
    }

    /// (bucket bound, cumulative count) of every bucket line.
    fn bucket_lines(text: &str) -> Vec<(String, u64)> {
        text.lines()
            .filter(|l| l.contains("_bucket{"))
            .map(|l| {
                let le = l
                    .split("le=\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .to_string();
                let value = l
                    .split("} ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
                (le, value)
            })
            .collect()
    }

    #[test]
    fn text_buckets_are_cumulative_and_end_with_the_count() {
        let mut counts = vec![0; BUCKETS];
        counts[0] = 2;
        counts[9] = 3;
        counts[14] = 1;
        let text = rendered(&snapshot(vec![series(1, 0, counts)]), false);
        let name = "http_server_request_duration_seconds";
        assert!(text.starts_with(&format!(
            "# HELP {name} Duration of HTTP server requests.\n# TYPE {name} histogram\n{name}_bucket{{"
        )));
        let buckets = bucket_lines(&text);
        let les: Vec<&str> = buckets.iter().map(|(le, _)| le.as_str()).collect();
        assert_eq!(
            les,
            [
                "0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1",
                "2.5", "5", "7.5", "10", "+Inf"
            ]
        );
        let values: Vec<u64> = buckets.iter().map(|(_, v)| *v).collect();
        assert_eq!(values, [2, 2, 2, 2, 2, 2, 2, 2, 2, 5, 5, 5, 5, 5, 6]);
        let labels = "service_name=\"shop\",process_pid=\"42\",http_route=\"/cart\"";
        assert!(text.contains(&format!("{name}_bucket{{{labels},le=\"+Inf\"}} 6\n")));
        assert!(text.ends_with(&format!(
            "{name}_sum{{{labels}}} 1.5\n{name}_count{{{labels}}} 6\n"
        )));
        assert!(!text.contains("# UNIT") && !text.contains("# EOF"));
    }

    #[test]
    fn text_format_has_no_exemplars() {
        let mut s = series(1, 0, vec![1; BUCKETS]);
        s.exemplars = vec![(
            2,
            Exemplar {
                value: 0.02,
                time_unix_nano: 1,
                trace_id: TRACE_HEX.into(),
                span_id: SPAN_HEX.into(),
            },
        )];
        let text = rendered(&snapshot(vec![s]), false);
        assert!(
            text.lines()
                .all(|l| l.starts_with("# HELP") || l.starts_with("# TYPE") || !l.contains('#')),
            "{text}"
        );
    }

    #[test]
    fn openmetrics_has_unit_exemplar_on_its_bucket_and_eof() {
        let mut s = series(1, 0, vec![1; BUCKETS]);
        let exemplar = |time_unix_nano, trace_id: &str| Exemplar {
            value: 0.02,
            time_unix_nano,
            trace_id: trace_id.into(),
            span_id: SPAN_HEX.into(),
        };
        s.exemplars = vec![
            (2, exemplar(1_700_000_000_123_456_789, TRACE_HEX)),
            (5, exemplar(1_700_000_000_000_000_000, "not hex")),
            (99, exemplar(1_700_000_000_000_000_000, TRACE_HEX)),
        ];
        let text = rendered(&snapshot(vec![s]), true);
        let name = "http_server_request_duration_seconds";
        assert!(text.starts_with(&format!(
            "# TYPE {name} histogram\n# UNIT {name} seconds\n# HELP {name} "
        )));
        assert!(text.ends_with("# EOF\n"));
        let with_exemplar: Vec<&str> = text.lines().filter(|l| l.contains(" # {")).collect();
        assert_eq!(with_exemplar.len(), 1, "{text}");
        assert!(with_exemplar[0].ends_with(&format!(
            "le=\"0.025\"}} 3 # {{trace_id=\"{TRACE_HEX}\",span_id=\"{SPAN_HEX}\"}} 0.02 1700000000.123456789"
        )));
        let les: Vec<String> = bucket_lines(&text).into_iter().map(|(le, _)| le).collect();
        assert_eq!(les[9], "1.0");
        assert_eq!(les[13], "10.0");
        assert_eq!(les[14], "+Inf");
    }

    #[test]
    fn label_names_are_sanitised_and_values_escaped() {
        let mut s = series(1, 0, vec![0; BUCKETS]);
        s.attributes = vec![
            ("http.route".into(), PointValue::Str("/a\\b\"c\nd".into())),
            ("http_route".into(), PointValue::Str("duplicate".into())),
            ("le".into(), PointValue::Str("reserved".into())),
            ("1st-try".into(), PointValue::Int(-3)),
            (
                "service.name".into(),
                PointValue::Str("clashes with the resource".into()),
            ),
        ];
        let mut snap = snapshot(vec![s]);
        snap.resources[0]
            .attributes
            .push(("k8s.pod.name".into(), PointValue::Str("shop-7d9".into())));
        let text = rendered(&snap, false);
        let count_line = text.lines().find(|l| l.contains("_count")).unwrap();
        assert_eq!(
            count_line,
            "http_server_request_duration_seconds_count{service_name=\"shop\",process_pid=\"42\",\
             k8s_pod_name=\"shop-7d9\",http_route=\"/a\\\\b\\\"c\\nd\",key_1st_try=\"-3\"} 0"
        );
    }

    #[test]
    fn one_block_per_metric_across_resources() {
        let mut snap = snapshot(vec![
            series(1, 0, vec![1; BUCKETS]),
            series(2, 1, vec![1; BUCKETS]),
        ]);
        snap.resources.push(resource("cart", 7));
        let mut client = series(3, 0, vec![1; BUCKETS]);
        client.metric = RedMetric::HttpClient;
        snap.series.insert(1, client);
        let text = rendered(&snap, true);
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            families,
            [
                "http_server_request_duration_seconds histogram",
                "http_client_request_duration_seconds histogram"
            ]
        );
        let server_lines: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.starts_with("http_server_request_duration_seconds_"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(server_lines.len(), 2 * (BUCKETS + 2));
        assert_eq!(
            server_lines.last().unwrap() - server_lines[0] + 1,
            server_lines.len(),
            "interleaved:\n{text}"
        );
        assert!(text.contains("service_name=\"cart\",process_pid=\"7\""));
    }

    #[test]
    fn odd_snapshots_render_without_panicking() {
        assert_eq!(rendered(&RedSnapshot::default(), false), "");
        assert_eq!(rendered(&RedSnapshot::default(), true), "# EOF\n");

        let mut short = series(1, 0, vec![2, 1]);
        short.sum = f64::NAN;
        let mut too_many = series(2, 0, vec![5; BUCKETS]);
        too_many.count = 7;
        let orphan = series(3, 9, vec![1; BUCKETS]);
        let text = rendered(&snapshot(vec![short, too_many, orphan]), false);
        let values: Vec<u64> = bucket_lines(&text).into_iter().map(|(_, v)| v).collect();
        assert_eq!(values.len(), 2 * BUCKETS);
        assert_eq!(values[..3], [2, 3, 3]);
        assert_eq!(values[BUCKETS - 1], 3);
        assert_eq!(values[BUCKETS..BUCKETS + 3], [5, 7, 7]);
        assert!(
            text.contains(
                "_sum{service_name=\"shop\",process_pid=\"42\",http_route=\"/cart\"} 0.0\n"
            )
        );
        assert!(!text.contains("NaN"));
    }

    #[test]
    fn floats_parse_as_prometheus_numbers() {
        assert_eq!(float(3.0), "3.0");
        assert_eq!(float(0.0123), "0.0123");
        assert_eq!(float(1e-7), "1e-7");
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NAN), "NaN");
    }

    #[test]
    fn openmetrics_is_wanted_when_accepted_with_nonzero_q() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert!(wants_openmetrics(prometheus));
        assert!(wants_openmetrics(
            "Application/OpenMetrics-Text ; Version = 1.0.0"
        ));
        assert!(!wants_openmetrics(
            "application/openmetrics-text; q=0, text/plain"
        ));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0.000"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
    }
}
