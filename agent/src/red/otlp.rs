//! RED snapshots as OTLP histograms, cumulative or delta.

use std::collections::{BTreeMap, HashMap};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Exemplar as OtlpExemplar, Histogram, HistogramDataPoint, Metric,
    ResourceMetrics, ScopeMetrics, exemplar, metric,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

use super::snapshot::{
    DURATION_BOUNDS_S, Exemplar, PointResource, PointValue, RedMetric, RedSnapshot, Series,
};
use super::{BUCKETS, bucket_counts, exemplar_ids};

/// How histogram points relate to time: counts since the series started,
/// or since the previous export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Temporality {
    #[default]
    Cumulative,
    Delta,
}

impl Temporality {
    /// Reads `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`. Both `delta`
    /// and `lowmemory` make histograms delta; an empty value means unset,
    /// which is the spec's default, cumulative.
    pub fn from_env_value(v: &str) -> Result<Temporality, String> {
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "cumulative" => Ok(Temporality::Cumulative),
            "delta" | "lowmemory" => Ok(Temporality::Delta),
            _ => Err(format!(
                "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE={v:?}: expected cumulative, delta or lowmemory"
            )),
        }
    }

    fn to_proto(self) -> AggregationTemporality {
        match self {
            Temporality::Cumulative => AggregationTemporality::Cumulative,
            Temporality::Delta => AggregationTemporality::Delta,
        }
    }
}

/// What delta export remembers between exports, per series id. Series that
/// are no longer in the snapshot are forgotten.
#[derive(Debug, Default)]
pub struct DeltaState {
    baselines: HashMap<u64, Baseline>,
}

impl DeltaState {
    /// The series' counts since its baseline, remembering the next baseline.
    fn advance(&mut self, series: &Series, baseline: Option<Baseline>, now: u64) -> PointCounts {
        let counts = delta_counts(series, baseline.as_ref());
        self.baselines
            .insert(series.id, next_baseline(series, &counts, baseline, now));
        counts
    }
}

/// A series' counts at the previous export, and where its next delta point
/// starts (the time of the last point sent for it, or the series' start).
#[derive(Debug, Clone)]
struct Baseline {
    count: u64,
    sum: f64,
    bucket_counts: [u64; BUCKETS],
    next_start_unix_nano: u64,
}

/// What one data point reports for a series.
struct PointCounts {
    start_unix_nano: u64,
    count: u64,
    sum: f64,
    bucket_counts: [u64; BUCKETS],
    /// Only exemplars recorded after this time belong to the point.
    exemplars_after: Option<u64>,
}

/// One export request: one ResourceMetrics per resource with points, one
/// histogram per RED metric with points.
pub fn to_request(
    snapshot: &RedSnapshot,
    temporality: Temporality,
    state: &mut DeltaState,
) -> ExportMetricsServiceRequest {
    // Baselines move back into the state as their series are seen; those of
    // series that are gone are dropped with `previous`.
    let mut previous = match temporality {
        Temporality::Delta => Some(std::mem::take(&mut state.baselines)),
        Temporality::Cumulative => None,
    };
    let mut grouped: BTreeMap<usize, BTreeMap<RedMetric, Vec<HistogramDataPoint>>> =
        BTreeMap::new();
    for series in &snapshot.series {
        let counts = match previous.as_mut() {
            Some(previous) => {
                state.advance(series, previous.remove(&series.id), snapshot.time_unix_nano)
            }
            None => cumulative_counts(series),
        };
        if temporality == Temporality::Delta && counts.count == 0 {
            continue;
        }
        let point = data_point(series, counts, snapshot.time_unix_nano);
        grouped
            .entry(series.resource)
            .or_default()
            .entry(series.metric)
            .or_default()
            .push(point);
    }
    let resource_metrics = grouped
        .into_iter()
        .filter_map(|(resource, metrics)| {
            Some(resource_metrics(
                snapshot.resources.get(resource)?,
                metrics,
                temporality,
            ))
        })
        .collect();
    ExportMetricsServiceRequest { resource_metrics }
}

fn cumulative_counts(series: &Series) -> PointCounts {
    PointCounts {
        start_unix_nano: series.start_unix_nano,
        count: series.count,
        sum: series.sum,
        bucket_counts: bucket_counts(series),
        exemplars_after: None,
    }
}

/// The series' counts since its baseline; all of them for a new series, or
/// when counts went backwards (a reset the aggregator should never make).
fn delta_counts(series: &Series, baseline: Option<&Baseline>) -> PointCounts {
    let current = bucket_counts(series);
    let Some(baseline) = baseline else {
        return cumulative_counts(series);
    };
    let start_unix_nano = baseline.next_start_unix_nano.max(series.start_unix_nano);
    let went_back = series.count < baseline.count
        || current
            .iter()
            .zip(&baseline.bucket_counts)
            .any(|(now, then)| now < then);
    if went_back {
        return PointCounts {
            start_unix_nano,
            exemplars_after: Some(start_unix_nano),
            ..cumulative_counts(series)
        };
    }
    let mut bucket_counts = current;
    for (count, then) in bucket_counts.iter_mut().zip(&baseline.bucket_counts) {
        *count -= then;
    }
    PointCounts {
        start_unix_nano,
        count: series.count - baseline.count,
        sum: (series.sum - baseline.sum).max(0.0),
        bucket_counts,
        exemplars_after: Some(start_unix_nano),
    }
}

/// The baseline for the next export. A point that is left out (nothing new)
/// does not move the next point's start: it then covers the quiet interval.
fn next_baseline(
    series: &Series,
    sent: &PointCounts,
    previous: Option<Baseline>,
    now: u64,
) -> Baseline {
    let next_start_unix_nano = match previous {
        Some(previous) if sent.count == 0 => previous.next_start_unix_nano,
        None if sent.count == 0 => series.start_unix_nano,
        _ => now,
    };
    Baseline {
        count: series.count,
        sum: series.sum,
        bucket_counts: bucket_counts(series),
        next_start_unix_nano,
    }
}

fn data_point(series: &Series, counts: PointCounts, now: u64) -> HistogramDataPoint {
    // The series' min and max are over its whole life: they hold for a point
    // only if the point covers that whole life.
    let covers_series_life = counts.start_unix_nano == series.start_unix_nano;
    let has_min_max = counts.count > 0 && covers_series_life;
    HistogramDataPoint {
        attributes: key_values(&series.attributes),
        start_time_unix_nano: counts.start_unix_nano,
        time_unix_nano: now,
        count: counts.count,
        sum: counts.sum.is_finite().then_some(counts.sum),
        bucket_counts: counts.bucket_counts.to_vec(),
        explicit_bounds: DURATION_BOUNDS_S.to_vec(),
        exemplars: series
            .exemplars
            .iter()
            .map(|(_, e)| e)
            .filter(|e| {
                counts
                    .exemplars_after
                    .is_none_or(|after| e.time_unix_nano > after)
            })
            .filter_map(otlp_exemplar)
            .collect(),
        min: finite(series.min).filter(|_| has_min_max),
        max: finite(series.max).filter(|_| has_min_max),
        ..Default::default()
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// None when the trace or span id is not valid hex.
fn otlp_exemplar(exemplar: &Exemplar) -> Option<OtlpExemplar> {
    let (trace_id, span_id) = exemplar_ids(exemplar)?;
    Some(OtlpExemplar {
        time_unix_nano: exemplar.time_unix_nano,
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        value: Some(exemplar::Value::AsDouble(exemplar.value)),
        ..Default::default()
    })
}

fn resource_metrics(
    resource: &PointResource,
    metrics: BTreeMap<RedMetric, Vec<HistogramDataPoint>>,
    temporality: Temporality,
) -> ResourceMetrics {
    ResourceMetrics {
        resource: Some(Resource {
            attributes: key_values(&resource.attributes),
            ..Default::default()
        }),
        scope_metrics: vec![ScopeMetrics {
            scope: Some(InstrumentationScope {
                name: "periscope".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Default::default()
            }),
            metrics: metrics
                .into_iter()
                .map(|(metric, points)| histogram(metric, points, temporality))
                .collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn histogram(
    metric: RedMetric,
    data_points: Vec<HistogramDataPoint>,
    temporality: Temporality,
) -> Metric {
    Metric {
        name: metric.name().into(),
        description: metric.description().into(),
        unit: "s".into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points,
            aggregation_temporality: temporality.to_proto() as i32,
        })),
        ..Default::default()
    }
}

fn key_values(attributes: &[(String, PointValue)]) -> Vec<KeyValue> {
    attributes
        .iter()
        .map(|(key, value)| KeyValue {
            key: key.clone(),
            value: Some(any_value(value)),
        })
        .collect()
}

fn any_value(value: &PointValue) -> AnyValue {
    let value = match value {
        PointValue::Str(s) => any_value::Value::StringValue(s.clone()),
        PointValue::Int(i) => any_value::Value::IntValue(*i),
    };
    AnyValue { value: Some(value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE_HEX: &str = "0af7651916cd43dd8448eb211c80319c";
    const SPAN_HEX: &str = "b7ad6b7169203331";

    /// Bucket counts, all buckets present, from (bucket, count) pairs.
    fn buckets(counts: &[(usize, u64)]) -> Vec<u64> {
        let mut all = vec![0; BUCKETS];
        for (bucket, count) in counts {
            all[*bucket] = *count;
        }
        all
    }

    fn series(id: u64, resource: usize, bucket_counts: Vec<u64>) -> Series {
        let count = bucket_counts.iter().sum();
        Series {
            id,
            metric: RedMetric::HttpServer,
            resource,
            attributes: vec![
                ("http.request.method".into(), PointValue::Str("GET".into())),
                ("http.response.status_code".into(), PointValue::Int(200)),
            ],
            start_unix_nano: 10,
            count,
            sum: count as f64 * 0.01,
            min: 0.004,
            max: 0.02,
            bucket_counts,
            exemplars: Vec::new(),
        }
    }

    fn exemplar(time_unix_nano: u64, trace_id: &str, span_id: &str) -> Exemplar {
        Exemplar {
            value: 0.02,
            time_unix_nano,
            trace_id: trace_id.into(),
            span_id: span_id.into(),
        }
    }

    fn snapshot(time_unix_nano: u64, series: Vec<Series>) -> RedSnapshot {
        RedSnapshot {
            time_unix_nano,
            enabled: true,
            resources: vec![PointResource {
                attributes: vec![
                    ("service.name".into(), PointValue::Str("shop".into())),
                    ("process.pid".into(), PointValue::Int(42)),
                ],
            }],
            series,
            ..Default::default()
        }
    }

    fn histograms(request: &ExportMetricsServiceRequest) -> Vec<&Histogram> {
        request
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .filter_map(|m| match &m.data {
                Some(metric::Data::Histogram(h)) => Some(h),
                _ => None,
            })
            .collect()
    }

    fn only_point(request: &ExportMetricsServiceRequest) -> &HistogramDataPoint {
        let histograms = histograms(request);
        assert_eq!(histograms.len(), 1);
        assert_eq!(histograms[0].data_points.len(), 1);
        &histograms[0].data_points[0]
    }

    #[test]
    fn delta_sends_increments_skips_quiet_series_and_forgets_gone_ones() {
        let mut state = DeltaState::default();
        let mut s = series(1, 0, buckets(&[(0, 1), (1, 2)]));
        s.exemplars = vec![(1, exemplar(50, TRACE_HEX, SPAN_HEX))];

        // New series: all its counts since its start, with its min and max.
        let first = to_request(
            &snapshot(100, vec![s.clone()]),
            Temporality::Delta,
            &mut state,
        );
        assert_eq!(
            histograms(&first)[0].aggregation_temporality,
            AggregationTemporality::Delta as i32
        );
        let p = only_point(&first);
        assert_eq!(
            (p.start_time_unix_nano, p.time_unix_nano, p.count),
            (10, 100, 3)
        );
        assert_eq!(p.bucket_counts, buckets(&[(0, 1), (1, 2)]));
        assert_eq!((p.min, p.max), (Some(0.004), Some(0.02)));
        assert_eq!(p.exemplars.len(), 1);

        // Increment: only what is new, from the previous export on.
        s.bucket_counts = buckets(&[(0, 1), (1, 3), (2, 1)]);
        s.count = 5;
        s.sum = 0.06;
        s.exemplars.push((2, exemplar(150, TRACE_HEX, SPAN_HEX)));
        let second = to_request(
            &snapshot(200, vec![s.clone()]),
            Temporality::Delta,
            &mut state,
        );
        let p = only_point(&second);
        assert_eq!(
            (p.start_time_unix_nano, p.time_unix_nano, p.count),
            (100, 200, 2)
        );
        assert_eq!(p.bucket_counts, buckets(&[(1, 1), (2, 1)]));
        assert!((p.sum.unwrap() - 0.03).abs() < 1e-9);
        assert_eq!((p.min, p.max), (None, None));
        assert_eq!(
            p.exemplars
                .iter()
                .map(|e| e.time_unix_nano)
                .collect::<Vec<_>>(),
            [150]
        );

        // No change: the point (and so its resource) is left out.
        let third = to_request(
            &snapshot(300, vec![s.clone()]),
            Temporality::Delta,
            &mut state,
        );
        assert!(third.resource_metrics.is_empty());

        // The next point covers the quiet interval too.
        s.bucket_counts[0] += 1;
        s.count += 1;
        let fourth = to_request(
            &snapshot(400, vec![s.clone()]),
            Temporality::Delta,
            &mut state,
        );
        let p = only_point(&fourth);
        assert_eq!((p.start_time_unix_nano, p.count), (200, 1));
        assert!(p.exemplars.is_empty());

        // Gone: forgotten, so if its id came back it would count as new.
        to_request(
            &snapshot(500, vec![series(2, 0, buckets(&[(0, 1)]))]),
            Temporality::Delta,
            &mut state,
        );
        assert_eq!(state.baselines.keys().collect::<Vec<_>>(), [&2]);
        let back = to_request(
            &snapshot(600, vec![s.clone()]),
            Temporality::Delta,
            &mut state,
        );
        let p = only_point(&back);
        assert_eq!((p.start_time_unix_nano, p.count), (10, 6));
    }

    #[test]
    fn delta_counts_that_went_back_are_sent_whole() {
        let mut state = DeltaState::default();
        let s = series(1, 0, buckets(&[(0, 5), (3, 5)]));
        to_request(&snapshot(100, vec![s]), Temporality::Delta, &mut state);
        let reset = series(1, 0, buckets(&[(0, 2), (3, 6)]));
        let request = to_request(&snapshot(200, vec![reset]), Temporality::Delta, &mut state);
        let p = only_point(&request);
        assert_eq!((p.start_time_unix_nano, p.count), (100, 8));
        assert_eq!(p.bucket_counts, buckets(&[(0, 2), (3, 6)]));
        assert_eq!(p.min, None);
    }

    #[test]
    fn cumulative_keeps_start_time_counts_and_all_exemplars() {
        let mut state = DeltaState::default();
        let mut s = series(1, 0, buckets(&[(0, 1), (14, 1)]));
        s.exemplars = vec![
            (0, exemplar(50, TRACE_HEX, SPAN_HEX)),
            (14, exemplar(60, TRACE_HEX, SPAN_HEX)),
        ];
        for now in [100, 200] {
            let request = to_request(
                &snapshot(now, vec![s.clone()]),
                Temporality::Cumulative,
                &mut state,
            );
            assert_eq!(
                histograms(&request)[0].aggregation_temporality,
                AggregationTemporality::Cumulative as i32
            );
            let p = only_point(&request);
            assert_eq!(
                (p.start_time_unix_nano, p.time_unix_nano, p.count),
                (10, now, 2)
            );
            assert_eq!(p.bucket_counts, s.bucket_counts);
            assert_eq!((p.min, p.max), (Some(0.004), Some(0.02)));
            assert_eq!(p.exemplars.len(), 2);
        }
        assert!(state.baselines.is_empty());
    }

    #[test]
    fn cumulative_series_without_spans_has_no_min_max() {
        let request = to_request(
            &snapshot(100, vec![series(1, 0, buckets(&[]))]),
            Temporality::Cumulative,
            &mut DeltaState::default(),
        );
        let p = only_point(&request);
        assert_eq!((p.count, p.min, p.max), (0, None, None));
    }

    #[test]
    fn exemplar_ids_are_bytes_and_invalid_hex_is_skipped() {
        let mut s = series(1, 0, buckets(&[(0, 4)]));
        s.exemplars = vec![
            (0, exemplar(50, TRACE_HEX, SPAN_HEX)),
            (
                0,
                exemplar(51, "zz f7651916cd43dd8448eb211c80319c", SPAN_HEX),
            ),
            (0, exemplar(52, TRACE_HEX, "b7ad6b71692033")),
            (0, exemplar(53, "", "")),
        ];
        let request = to_request(
            &snapshot(100, vec![s]),
            Temporality::Cumulative,
            &mut DeltaState::default(),
        );
        let exemplars = &only_point(&request).exemplars;
        assert_eq!(exemplars.len(), 1);
        let e = &exemplars[0];
        assert_eq!(e.trace_id[..4], [0x0a, 0xf7, 0x65, 0x19]);
        assert_eq!(e.trace_id.len(), 16);
        assert_eq!(e.span_id, [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]);
        assert_eq!(
            (e.time_unix_nano, e.value),
            (50, Some(exemplar::Value::AsDouble(0.02)))
        );
    }

    #[test]
    fn request_has_resources_scope_and_histogram_shape() {
        let mut snap = snapshot(
            100,
            vec![
                series(1, 0, buckets(&[(0, 1)])),
                series(2, 2, buckets(&[(1, 2)])),
            ],
        );
        snap.resources.push(PointResource::default()); // no series: no ResourceMetrics
        snap.resources.push(PointResource {
            attributes: vec![("service.name".into(), PointValue::Str("cart".into()))],
        });
        let mut dns = series(3, 0, buckets(&[(2, 1)]));
        dns.metric = RedMetric::DnsLookup;
        snap.series.push(dns);
        let request = to_request(&snap, Temporality::Cumulative, &mut DeltaState::default());
        assert_eq!(request.resource_metrics.len(), 2);

        let rm = &request.resource_metrics[0];
        let attributes = &rm.resource.as_ref().unwrap().attributes;
        assert_eq!(
            attributes[0].value,
            Some(AnyValue {
                value: Some(any_value::Value::StringValue("shop".into()))
            })
        );
        assert_eq!(
            attributes[1].value,
            Some(AnyValue {
                value: Some(any_value::Value::IntValue(42))
            })
        );
        let scope = rm.scope_metrics[0].scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("periscope", env!("CARGO_PKG_VERSION"))
        );

        let metrics = &rm.scope_metrics[0].metrics;
        let names: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["http.server.request.duration", "dns.lookup.duration"]
        );
        let http = &metrics[0];
        assert_eq!(
            (http.unit.as_str(), http.description.as_str()),
            ("s", RedMetric::HttpServer.description())
        );
        let Some(metric::Data::Histogram(h)) = &http.data else {
            panic!("not a histogram")
        };
        let p = &h.data_points[0];
        assert_eq!(p.explicit_bounds, DURATION_BOUNDS_S);
        assert_eq!(p.bucket_counts.len(), DURATION_BOUNDS_S.len() + 1);
        assert_eq!(
            p.attributes[1].value,
            Some(AnyValue {
                value: Some(any_value::Value::IntValue(200))
            })
        );
    }

    #[test]
    fn odd_snapshots_do_not_panic() {
        let mut state = DeltaState::default();
        assert!(
            to_request(&RedSnapshot::default(), Temporality::Delta, &mut state)
                .resource_metrics
                .is_empty()
        );

        let mut short = series(1, 0, vec![2, 1]);
        short.count = 3;
        let mut long = series(2, 0, vec![1; 20]);
        long.count = 20;
        let orphan = series(3, 7, buckets(&[(0, 1)]));
        let snap = snapshot(100, vec![short, long, orphan]);
        for temporality in [Temporality::Cumulative, Temporality::Delta] {
            let request = to_request(&snap, temporality, &mut state);
            let points = &histograms(&request)[0].data_points;
            assert_eq!(points.len(), 2);
            assert_eq!(points[0].bucket_counts, buckets(&[(0, 2), (1, 1)]));
            assert_eq!(points[1].bucket_counts, vec![1; BUCKETS]);
        }
    }

    #[test]
    fn temporality_from_env_value() {
        assert_eq!(
            Temporality::from_env_value("cumulative"),
            Ok(Temporality::Cumulative)
        );
        assert_eq!(Temporality::from_env_value("Delta"), Ok(Temporality::Delta));
        assert_eq!(
            Temporality::from_env_value(" LOWMEMORY "),
            Ok(Temporality::Delta)
        );
        assert_eq!(Temporality::from_env_value(""), Ok(Temporality::Cumulative));
        let err = Temporality::from_env_value("sometimes").unwrap_err();
        assert!(err.contains("sometimes"), "{err}");
    }
}
