//! `chart.png`: throughput against `none` and added latency per request for
//! every workload and configuration, and the scaling run (agent CPU and RSS
//! against the request rate). Drawn with plotters' bitmap backend; text
//! through ab_glyph with DejaVu Sans read from the system (Debian's
//! `fonts-dejavu-core`, installed by the bench), so nothing is needed at
//! build time.

use super::report::{
    RSS_TARGET_RATE, Report, TARGET_HTTP_RATIO, TARGET_HTTPS_RATIO, TARGET_RSS_MIB,
};
use super::{CONFIGS, Config, SCALING, ScalingSample, WORKLOADS};
use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT: &str = "sans-serif";

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

/// Register DejaVu Sans for plotters' ab_glyph text (once per process).
fn register_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = crate::setup::BENCH_FONT;
        let bytes = std::fs::read(path).map_err(|e| {
            format!("reading {path} ({e}): install it with `apt-get install fonts-dejavu-core`")
        })?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a font plotters can read"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

fn color(c: Config) -> RGBColor {
    match c {
        Config::None => RGBColor(150, 150, 150),
        Config::Periscope => RGBColor(31, 119, 180),
        Config::Floor => RGBColor(127, 127, 127),
        Config::TlsOff => RGBColor(44, 160, 44),
        Config::MetricsOff => RGBColor(148, 103, 189),
        Config::Otel => RGBColor(214, 39, 40),
    }
}

/// The configurations compared with `none` that were measured.
fn compared(r: &Report) -> Vec<Config> {
    CONFIGS
        .into_iter()
        .filter(|c| *c != Config::None && WORKLOADS.iter().any(|w| r.measured(*w, *c)))
        .collect()
}

/// One bar: (workload index, config index, value).
struct Bar {
    w: usize,
    c: usize,
    v: f64,
}

/// Where the bar of config `c` (of `n`) for workload `w` goes: [x0, x1].
fn bar_x(w: usize, c: usize, n: usize) -> (f64, f64) {
    let group = 0.8;
    let width = group / n.max(1) as f64;
    let x0 = w as f64 + (1.0 - group) / 2.0 + c as f64 * width;
    (x0 + width * 0.08, x0 + width * 0.92)
}

fn grouped_bars(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    configs: &[Config],
    bars: &[Bar],
    fmt: &dyn Fn(f64) -> String,
    reference: &[f64],
) -> Result<()> {
    let n = WORKLOADS.len();
    let (mut lo, mut hi) = (0.0f64, 0.0f64);
    for b in bars {
        lo = lo.min(b.v);
        hi = hi.max(b.v);
    }
    for y in reference {
        hi = hi.max(*y);
    }
    let span = (hi - lo).max(1e-9);
    // Head room for the legend.
    let (lo, hi) = (
        if lo < 0.0 { lo - span * 0.12 } else { 0.0 },
        hi + span * 0.45,
    );
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Labels every 0.5: the workload's name at the middle of its group.
        .x_labels(2 * n + 1)
        .x_label_formatter(&|x| {
            let i = (x - 0.5).round();
            if i < 0.0 || (x - (i + 0.5)).abs() > 1e-6 {
                return String::new();
            }
            WORKLOADS
                .get(i as usize)
                .map_or(String::new(), |w| w.short().to_string())
        })
        .x_label_style((FONT, 15))
        .y_label_style((FONT, 13))
        .y_desc(y_desc)
        .y_label_formatter(&|y| fmt(*y))
        .draw()
        .map_err(err)?;
    for y in reference {
        let y = *y;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, y), (n as f64, y)],
                6,
                4,
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(err)?;
    }
    if lo < 0.0 {
        chart
            .draw_series(LineSeries::new(
                [(0.0, 0.0), (n as f64, 0.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(err)?;
    }
    for (ci, c) in configs.iter().enumerate() {
        let col = color(*c);
        let mine: Vec<&Bar> = bars.iter().filter(|b| b.c == ci).collect();
        chart
            .draw_series(mine.iter().map(|b| {
                let (x0, x1) = bar_x(b.w, b.c, configs.len());
                Rectangle::new([(x0, 0.0), (x1, b.v)], col.filled())
            }))
            .map_err(err)?
            .label(c.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], col.filled()));
        chart
            .draw_series(mine.iter().map(|b| {
                let (x0, _) = bar_x(b.w, b.c, configs.len());
                let y = if b.v >= 0.0 {
                    b.v + span * 0.015
                } else {
                    b.v - span * 0.06
                };
                Text::new(fmt(b.v), (x0, y), (FONT, 11))
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

fn scaling_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    r: &Report,
) -> Result<()> {
    // (asked rate, achieved k req/s, agent CPU ms/s, RSS MiB, lost, dropped)
    let mut pts = Vec::new();
    for (rate, _) in SCALING {
        let a = r.scale_agg(rate);
        if let (Some(rps), Some(cpu), Some(rss)) = (a.rps, a.agent_cpu_per_s, a.peak_rss_mib) {
            pts.push((
                rate,
                rps / 1000.0,
                cpu,
                rss,
                a.lost.unwrap_or(0),
                a.dropped.unwrap_or(0),
            ));
        }
    }
    // Room on the right for the last point's label.
    let x_hi = pts.iter().map(|p| p.1).fold(1.0f64, f64::max) * 1.4;
    let cpu_hi = pts.iter().map(|p| p.2).fold(100.0f64, f64::max) * 1.25;
    let rss_hi = pts.iter().map(|p| p.3).fold(TARGET_RSS_MIB, f64::max) * 1.25;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Scaling: nginx HTTP keep-alive with Periscope, hey at 1k/5k/20k req/s and max",
            (FONT, 22),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0f64..x_hi, 0f64..cpu_hi)
        .map_err(err)?
        .set_secondary_coord(0f64..x_hi, 0f64..rss_hi);
    chart
        .configure_mesh()
        .x_desc("achieved k requests / s")
        .y_desc("agent CPU ms per s (1000 = 1 core)")
        .x_label_style((FONT, 13))
        .y_label_style((FONT, 13))
        .draw()
        .map_err(err)?;
    chart
        .configure_secondary_axes()
        .y_desc("agent peak RSS MiB")
        .label_style((FONT, 13))
        .draw()
        .map_err(err)?;
    let blue = color(Config::Periscope);
    let orange = RGBColor(255, 127, 14);
    chart
        .draw_series(LineSeries::new(
            pts.iter().map(|p| (p.1, p.2)),
            blue.stroke_width(2),
        ))
        .map_err(err)?
        .label("agent CPU ms / s")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], blue.stroke_width(2)));
    chart
        .draw_series(
            pts.iter()
                .map(|p| Circle::new((p.1, p.2), 4, blue.filled())),
        )
        .map_err(err)?;
    chart
        .draw_secondary_series(LineSeries::new(
            pts.iter().map(|p| (p.1, p.3)),
            orange.stroke_width(2),
        ))
        .map_err(err)?
        .label("agent peak RSS MiB")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], orange.stroke_width(2)));
    chart
        .draw_secondary_series(
            pts.iter()
                .map(|p| Circle::new((p.1, p.3), 4, orange.filled())),
        )
        .map_err(err)?;
    chart
        .draw_secondary_series(DashedLineSeries::new(
            [(0.0, TARGET_RSS_MIB), (x_hi, TARGET_RSS_MIB)],
            6,
            4,
            RED.mix(0.6).stroke_width(1),
        ))
        .map_err(err)?;
    chart
        .draw_secondary_series(std::iter::once(Text::new(
            format!(
                "RSS target {TARGET_RSS_MIB:.0} MiB (at {}k req/s)",
                RSS_TARGET_RATE / 1000
            ),
            (x_hi * 0.01, TARGET_RSS_MIB + rss_hi * 0.015),
            (FONT, 12).into_font().color(&RED),
        )))
        .map_err(err)?;
    for p in &pts {
        let mut label = ScalingSample::rate_label(p.0);
        if p.4 > 0 {
            label.push_str(&format!(", {} events lost", p.4));
        }
        if p.5 > 0 {
            label.push_str(&format!(", {} spans dropped", p.5));
        }
        let style = if p.4 > 0 || p.5 > 0 {
            (FONT, 12).into_font().color(&RED)
        } else {
            (FONT, 12).into_font().color(&BLACK)
        };
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (p.1 + x_hi * 0.008, p.2 + cpu_hi * 0.03),
                style,
            )))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 13))
        .draw()
        .map_err(err)?;
    Ok(())
}

pub fn draw(r: &Report, path: &Path) -> Result<()> {
    register_font()?;
    let configs = compared(r);
    let mut ratio_bars = Vec::new();
    let mut latency_bars = Vec::new();
    for (wi, w) in WORKLOADS.iter().enumerate() {
        for (ci, c) in configs.iter().enumerate() {
            if !r.measured(*w, *c) {
                continue;
            }
            let o = r.overhead(*w, *c);
            if let Some(t) = o.throughput_ratio {
                ratio_bars.push(Bar {
                    w: wi,
                    c: ci,
                    v: t * 100.0,
                });
            }
            if let Some(l) = o.added_p50_us {
                latency_bars.push(Bar { w: wi, c: ci, v: l });
            }
        }
    }
    {
        // About 160 px per workload group, for its label.
        let width = 100 + 160 * WORKLOADS.len() as u32;
        let root = BitMapBackend::new(path, (width, 1560)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, rest) = root.split_vertically(520);
        let (middle, bottom) = rest.split_vertically(520);
        let mode = if r.quick { "quick" } else { "full" };
        grouped_bars(
            &top,
            &format!(
                "Throughput, % of none (dashed: 100% and the HTTP keep-alive target {:.0}%; HTTPS: {:.0}% of the floor's; {} round(s), {mode} run {} UTC)",
                TARGET_HTTP_RATIO * 100.0,
                TARGET_HTTPS_RATIO * 100.0,
                r.rounds,
                r.started
            ),
            "% of none (req/s)",
            &configs,
            &ratio_bars,
            &|v| format!("{v:.0}%"),
            &[100.0, TARGET_HTTP_RATIO * 100.0],
        )?;
        grouped_bars(
            &middle,
            "Added latency per request: p50 with - p50 without (microseconds)",
            "added p50 (us)",
            &configs,
            &latency_bars,
            &|v| format!("{v:.0}"),
            &[],
        )?;
        scaling_panel(&bottom, r)?;
        root.present().map_err(err)?;
    }
    let meta =
        std::fs::metadata(path).with_context(|| format!("{} was not written", path.display()))?;
    if meta.len() == 0 {
        return Err(anyhow!("{} is empty", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_stay_in_their_group() {
        for n in 1..=super::CONFIGS.len() - 1 {
            let mut last = 0.0;
            for c in 0..n {
                let (x0, x1) = bar_x(2, c, n);
                assert!(
                    x0 > 2.0 && x1 < 3.0 && x0 < x1 && x0 >= last,
                    "n {n} c {c}: {x0}..{x1}"
                );
                last = x1;
            }
        }
    }

    /// Draws the chart of a made-up report and checks that it is a PNG with
    /// text in it (DejaVu Sans is read from the system: fonts-dejavu-core).
    #[test]
    fn draws_a_png() {
        let r = super::super::report::tests::full_report();
        let dir = periscope_tests::proc::TempDir::new("bench-chart").unwrap();
        let path = dir.join("chart.png");
        draw(&r, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 20_000, "{} bytes", bytes.len());
        if let Ok(keep) = std::env::var("BENCH_CHART_KEEP") {
            std::fs::copy(&path, keep).unwrap();
        }
    }
}
