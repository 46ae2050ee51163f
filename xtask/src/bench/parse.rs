//! Parsers for what the load generators, the agent, Rotel, Python and /proc
//! print. Unit-tested below with output captured on the project's machines
//! (`testdata/` beside this file and `bench/testdata/` at the workspace root).

use anyhow::{Context, Result, bail};

/// What the load generator reported, in one shape for wrk, hey and ab.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadResult {
    /// Completed requests (responses received).
    pub requests: u64,
    pub rps: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Socket errors (wrk), failed requests (hey, ab).
    pub errors: u64,
    /// Responses that were not 2xx/3xx.
    pub non_2xx: u64,
    /// Response body bytes received, when the load generator says (h2load's
    /// `data`: DATA frame payload).
    pub body_bytes: Option<u64>,
}

/// `stopped: N events, N spans built, N exported, N dropped, N events lost in kernel`
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopLine {
    pub events: u64,
    pub spans_built: u64,
    pub exported: u64,
    pub dropped: u64,
    pub lost: u64,
    /// Spans of kind SERVER or CLIENT built (one per request on each traced
    /// side, phase spans excluded), if the agent reports it
    /// (`, N request spans` at the end of the line).
    pub request_spans: Option<u64>,
}

/// A wrk duration (`179.00us`, `1.23ms`, `2.00s`, `1.50m`, `1.00h`) in microseconds.
pub fn parse_wrk_time(s: &str) -> Option<f64> {
    let s = s.trim().trim_end_matches(',');
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(v * scale)
}

pub fn parse_wrk(text: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    let mut in_dist = false;
    let (mut have_rps, mut have_requests) = (false, false);
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut it = t.split_whitespace();
            if let (Some(pct), Some(val)) = (it.next(), it.next())
                && let Some(p) = pct.strip_suffix('%')
            {
                let v = parse_wrk_time(val);
                match p {
                    "50" => r.p50_us = v,
                    "99" => r.p99_us = v,
                    _ => {}
                }
                continue;
            }
            in_dist = false;
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("Requests/sec")?;
            have_rps = true;
        } else if let Some((n, rest)) = t.split_once(" requests in ") {
            if rest
                .split_whitespace()
                .next()
                .and_then(parse_wrk_time)
                .is_some()
            {
                r.requests = n.trim().parse().context("N requests in")?;
                have_requests = true;
            }
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // connect 0, read 0, write 0, timeout 0
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    r.errors += n.parse::<u64>().context("Socket errors")?;
                }
            }
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("Non-2xx")?;
        }
    }
    if !have_rps || !have_requests {
        bail!("no `Requests/sec:` or `N requests in` line in wrk's output");
    }
    Ok(r)
}

pub fn parse_hey(text: &str) -> Result<LoadResult> {
    #[derive(PartialEq)]
    enum Section {
        Other,
        Latency,
        Status,
        Errors,
    }
    let mut r = LoadResult::default();
    let mut section = Section::Other;
    let mut have_rps = false;
    let mut total_s = None;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        match t {
            "Latency distribution:" => {
                section = Section::Latency;
                continue;
            }
            "Status code distribution:" => {
                section = Section::Status;
                continue;
            }
            "Error distribution:" => {
                section = Section::Errors;
                continue;
            }
            _ => {}
        }
        if t.ends_with(':') || t.starts_with("Details") || t.starts_with("Response time histogram")
        {
            section = Section::Other;
            continue;
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("Requests/sec")?;
            have_rps = true;
            continue;
        }
        if let Some(v) = t.strip_prefix("Total:") {
            total_s = v
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok());
            continue;
        }
        match section {
            Section::Latency => {
                // "50% in 0.0002 secs"
                let mut it = t.split_whitespace();
                if let (Some(pct), Some("in"), Some(v), Some("secs")) =
                    (it.next(), it.next(), it.next(), it.next())
                {
                    let us = v.parse::<f64>().ok().map(|s| s * 1e6);
                    match pct {
                        "50%" => r.p50_us = us,
                        "99%" => r.p99_us = us,
                        _ => {}
                    }
                }
            }
            Section::Status | Section::Errors => {
                // "[200]\t24944 responses" / "[3]\tGet http://...: EOF"
                if let Some(rest) = t.strip_prefix('[')
                    && let Some((a, b)) = rest.split_once(']')
                {
                    if section == Section::Status {
                        let code: u32 = a.parse().context("status code")?;
                        let n: u64 = b
                            .split_whitespace()
                            .next()
                            .unwrap_or("")
                            .parse()
                            .context("response count")?;
                        r.requests += n;
                        if !(200..400).contains(&code) {
                            r.non_2xx += n;
                        }
                    } else {
                        r.errors += a.parse::<u64>().context("error count")?;
                    }
                }
            }
            Section::Other => {}
        }
    }
    if !have_rps {
        bail!("no `Requests/sec:` line in hey's output");
    }
    // hey's Requests/sec counts failed requests too; count responses, as wrk does.
    if let Some(t) = total_s.filter(|t| *t > 0.0) {
        r.rps = r.requests as f64 / t;
    }
    Ok(r)
}

/// ApacheBench's report (stdout) and its `-e` CSV of percentiles
/// (`Percentage served,Time in ms` then `0,0.523` .. `100,4.902`). The CSV
/// has microsecond resolution; the percentile table on stdout only whole
/// milliseconds, so p50/p99 come from the CSV.
pub fn parse_ab(text: &str, csv: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    let (mut have_complete, mut have_rps) = (false, false);
    for line in text.lines() {
        let t = line.trim();
        let field = |prefix: &str| {
            t.strip_prefix(prefix)
                .and_then(|v| v.split_whitespace().next())
        };
        if let Some(v) = field("Complete requests:") {
            r.requests = v.parse().context("Complete requests")?;
            have_complete = true;
        } else if let Some(v) = field("Failed requests:") {
            r.errors = v.parse().context("Failed requests")?;
        } else if let Some(v) = field("Non-2xx responses:") {
            r.non_2xx = v.parse().context("Non-2xx responses")?;
        } else if let Some(v) = field("Requests per second:") {
            r.rps = v.parse().context("Requests per second")?;
            have_rps = true;
        }
    }
    if !have_complete || !have_rps {
        bail!("no `Complete requests:` or `Requests per second:` line in ab's output");
    }
    if r.requests > 0 {
        let pct = parse_ab_csv(csv).context("ab's -e CSV")?;
        let at = |p: u32| pct.iter().find(|(q, _)| *q == p).map(|(_, ms)| ms * 1e3);
        r.p50_us = at(50);
        r.p99_us = at(99);
        if r.p50_us.is_none() || r.p99_us.is_none() {
            bail!("ab's CSV has no 50 or 99 percentile row");
        }
    }
    Ok(r)
}

/// `Percentage served,Time in ms` rows: (percent, milliseconds).
pub fn parse_ab_csv(csv: &str) -> Result<Vec<(u32, f64)>> {
    let mut rows = Vec::new();
    for (i, line) in csv.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || (i == 0 && t.starts_with("Percentage")) {
            continue;
        }
        let (p, ms) = t
            .split_once(',')
            .with_context(|| format!("line {}: {t:?}", i + 1))?;
        rows.push((
            p.trim()
                .parse()
                .with_context(|| format!("line {}: {t:?}", i + 1))?,
            ms.trim()
                .parse()
                .with_context(|| format!("line {}: {t:?}", i + 1))?,
        ));
    }
    if rows.is_empty() {
        bail!("no rows");
    }
    Ok(rows)
}

/// h2load's report (stdout) and its `--log-file` (one line per request
/// completed in the measured period: start time in µs since the epoch,
/// status code, µs until the end of the response). h2load's report has only
/// the mean and the spread of request times, so p50/p99 come from the log.
///
/// `requests:` counts `done` (every stream closed, whatever happened),
/// `succeeded` (a 2xx/3xx response), `failed` (the rest: other statuses and
/// errors) and `errored` (no response: reset, connection lost). Here
/// requests = done - errored (responses received, as wrk counts them),
/// errors = errored, non_2xx = the 4xx and 5xx of `status codes:`. h2load's
/// req/s is done per second of the measured period; it is scaled to the
/// responses received.
pub fn parse_h2load(text: &str, log: &str) -> Result<LoadResult> {
    let mut r = LoadResult::default();
    let (mut have_finished, mut have_requests) = (false, false);
    let mut done = 0u64;
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("finished in ") {
            // "finished in 3.00s, 46437.33 req/s, 7.31MB/s"
            let rps = v
                .split(',')
                .nth(1)
                .and_then(|p| p.trim().strip_suffix(" req/s"))
                .context("no req/s in `finished in` line")?;
            r.rps = rps.trim().parse().context("req/s")?;
            have_finished = true;
        } else if let Some(v) = t.strip_prefix("requests:") {
            // "requests: 8068 total, 8072 started, 8068 done, 8000 succeeded, 68 failed, 68 errored, 0 timeout"
            let count = |label: &str| -> Result<u64> {
                v.split(',')
                    .find_map(|p| p.trim().strip_suffix(label))
                    .with_context(|| format!("no `{}` count in `requests:`", label.trim()))?
                    .trim()
                    .parse()
                    .with_context(|| format!("`{}` count", label.trim()))
            };
            done = count(" done")?;
            r.errors = count(" errored")?;
            r.requests = done.saturating_sub(r.errors);
            have_requests = true;
        } else if let Some(v) = t.strip_prefix("status codes:") {
            // "status codes: 139313 2xx, 0 3xx, 0 4xx, 0 5xx"
            for p in v.split(',') {
                let mut it = p.split_whitespace();
                if let (Some(n), Some("4xx" | "5xx")) = (it.next(), it.next()) {
                    r.non_2xx += n.parse::<u64>().context("status code count")?;
                }
            }
        } else if let Some(v) = t.strip_prefix("traffic:") {
            // "traffic: 21.92MB (22986986) total, 13.95MB (14627865) headers (space savings 40.00%), 5.58MB (5851104) data"
            r.body_bytes = v
                .split(',')
                .find(|p| p.trim_end().ends_with(" data"))
                .and_then(|p| p.split_once('(')?.1.split_once(')'))
                .and_then(|(n, _)| n.parse().ok());
        }
    }
    if !have_finished || !have_requests {
        bail!("no `finished in` or `requests:` line in h2load's output");
    }
    if done > 0 {
        r.rps *= r.requests as f64 / done as f64;
    }
    if r.requests > 0 {
        let mut times = parse_h2load_log(log).context("h2load's --log-file")?;
        r.p50_us = percentile(&mut times, 50.0);
        r.p99_us = percentile(&mut times, 99.0);
    }
    Ok(r)
}

/// The request times (µs, the third column) of h2load's `--log-file`.
pub fn parse_h2load_log(log: &str) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for (i, line) in log.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let us = t
            .split_whitespace()
            .nth(2)
            .and_then(|f| f.parse::<u64>().ok())
            .with_context(|| format!("line {}: {t:?}", i + 1))?;
        v.push(us as f64);
    }
    if v.is_empty() {
        bail!("no requests");
    }
    Ok(v)
}

/// The nearest-rank percentile `p` (0-100] of `v` (sorted in place).
pub fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

/// h2load's `Application protocol:` line (`h2c`, `h2`, `http/1.1`).
pub fn h2load_protocol(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Application protocol:"))
        .map(str::trim)
}

/// Responses among `load.requests` that did not carry a gRPC message of
/// `message_len` bytes (a gRPC error is a 200 with the status in the
/// trailers and no message): the body bytes h2load received fall short by
/// that many messages. None when h2load did not report its body bytes.
pub fn grpc_responses_without_message(load: &LoadResult, message_len: u64) -> Option<u64> {
    let bytes = load.body_bytes?;
    let with_message = bytes / message_len.max(1);
    Some(load.requests.saturating_sub(with_message))
}

/// The status code `grpcgo call PORT NAME` printed for `name` (its line
/// `reply NAME CODE`: `OK`, `NotFound`, `Unavailable`, ...).
pub fn grpcgo_reply_code<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let code = l
            .trim_end()
            .strip_prefix("reply ")?
            .strip_prefix(name)?
            .strip_prefix(' ')?;
        (!code.is_empty() && !code.contains(' ')).then_some(code)
    })
}

/// The agent's last words: `... stopped: 1 events, 2 spans built, 3 exported, 4 dropped, 5 events lost in kernel`.
pub fn parse_stop_line(line: &str) -> Option<StopLine> {
    let (_, rest) = line.split_once("stopped:")?;
    let mut s = StopLine::default();
    let mut seen = 0;
    for part in rest.split(',') {
        let part = part.trim();
        let (n, label) = part.split_once(' ')?;
        let n: u64 = n.parse().ok()?;
        let slot = match label.trim() {
            "events" => &mut s.events,
            "spans built" => &mut s.spans_built,
            "exported" => &mut s.exported,
            "dropped" => &mut s.dropped,
            l if l.starts_with("events lost") => &mut s.lost,
            "request spans" => {
                s.request_spans = Some(n);
                continue;
            }
            _ => continue,
        };
        *slot = n;
        seen += 1;
    }
    (seen == 5).then_some(s)
}

/// Remove ANSI escape sequences (`ESC [ ... letter`), which Rotel's log
/// carries when colours are on.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Spans in one line of Rotel's `--debug-log traces` (basic verbosity) log:
/// `... INFO Received traces. data_type="traces" resource_spans=1 spans=6`.
pub fn parse_rotel_spans(line: &str) -> Option<u64> {
    if !line.contains("Received traces") {
        return None;
    }
    let clean = strip_ansi(line);
    clean
        .split_whitespace()
        .find_map(|w| w.strip_prefix("spans="))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// The port in the Go server's first line, `listening PORT`.
pub fn parse_listening(line: &str) -> Option<u16> {
    line.trim()
        .strip_prefix("listening ")?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
}

/// `tls-calls N cpu_s S version V` -> (N, S).
pub fn parse_tls_calls(text: &str) -> Result<(u64, f64)> {
    let line = text
        .lines()
        .find(|l| l.starts_with("tls-calls "))
        .context("no `tls-calls` line")?;
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 4 || f[2] != "cpu_s" {
        bail!("unexpected line {line:?}");
    }
    Ok((f[1].parse()?, f[3].parse()?))
}

/// utime + stime (clock ticks) from a `/proc/PID/stat` line.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the parenthesised comm start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// One BPF program's counters from `/proc/PID/fdinfo/FD`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    pub id: u32,
    /// Time spent in the program, summed over runs (counted only while
    /// `kernel.bpf_stats_enabled` is 1).
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The counters of a BPF program fd's fdinfo (`prog_id:`, `run_time_ns:`,
/// `run_cnt:`); None for anything else (a map, a link: they have no run
/// counters).
pub fn parse_fdinfo_prog(text: &str) -> Option<ProgStats> {
    let field = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(ProgStats {
        id: u32::try_from(field("prog_id")?).ok()?,
        run_time_ns: field("run_time_ns")?,
        run_cnt: field("run_cnt")?,
    })
}

/// Whether `perf stat -x, -e EVENT` counted the event (CSV on stderr:
/// `COUNT,UNIT,EVENT,...`; `<not supported>` or `<not counted>` otherwise).
pub fn perf_stat_counted(stderr: &str, event: &str) -> bool {
    stderr.lines().any(|l| {
        let mut f = l.split(',');
        let count = f.next().unwrap_or("");
        let named = f.nth(1).is_some_and(|e| e.trim().starts_with(event));
        named && count.trim().parse::<u64>().is_ok_and(|c| c > 0)
    })
}

/// The sample count of `perf record`'s closing line
/// (`[ perf record: Captured and wrote 27.523 MB perf.data (3406 samples) ]`).
pub fn parse_perf_record_samples(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("perf record: Captured"))?;
    let (_, tail) = line.rsplit_once('(')?;
    tail.split_whitespace().next()?.parse().ok()
}

/// Whether `periscope run --noop-probes --help` was accepted: clap prints
/// the help and exits 0 for a known flag, and says `unexpected argument`
/// (exit 2) for an unknown one.
pub fn noop_flag_accepted(exit_ok: bool, stderr: &str) -> bool {
    exit_ok && !stderr.contains("unexpected argument")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_times() {
        assert_eq!(parse_wrk_time("179.00us"), Some(179.0));
        assert_eq!(parse_wrk_time("1.50ms"), Some(1500.0));
        assert_eq!(parse_wrk_time("2.00s"), Some(2e6));
        assert_eq!(parse_wrk_time("1.00m"), Some(60e6));
        assert_eq!(parse_wrk_time("5.10s,"), Some(5.1e6));
        assert_eq!(parse_wrk_time("98.71%"), None);
        assert_eq!(parse_wrk_time("12"), None);
    }

    /// Real output captured from wrk 4.1.0 and hey 0.1.4 on the project's machines.
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../../bench/testdata/", $name))
        };
    }

    /// Real output captured from ab 2.3 (apache2-utils 2.4.71), Rotel and
    /// gunicorn on the project's machines.
    macro_rules! local_fixture {
        ($name:literal) => {
            include_str!(concat!("testdata/", $name))
        };
    }

    #[test]
    fn wrk_outputs() {
        let r = parse_wrk(fixture!("wrk-16conns.txt")).unwrap();
        assert_eq!(
            r,
            LoadResult {
                requests: 433_365,
                rps: 84_961.63,
                p50_us: Some(179.0),
                p99_us: Some(351.0),
                errors: 0,
                non_2xx: 0,
                body_bytes: None,
            }
        );
        let r = parse_wrk(fixture!("wrk-400conns-ms.txt")).unwrap();
        assert_eq!(
            (r.requests, r.p50_us, r.p99_us),
            (238_041, Some(4550.0), Some(10_490.0))
        );
        let r = parse_wrk(fixture!("wrk-404.txt")).unwrap();
        assert_eq!((r.requests, r.non_2xx, r.errors), (206_612, 206_612, 0));
        let r = parse_wrk(fixture!("wrk-socket-errors.txt")).unwrap();
        assert_eq!((r.requests, r.errors, r.rps), (134_038, 640, 64_876.02));
        assert!((r.p99_us.unwrap() - 990_660.0).abs() < 1e-6);
        assert!(parse_wrk("unable to connect to 127.0.0.1:18099 Connection refused\n").is_err());
    }

    #[test]
    fn wrk_against_gunicorn() {
        let r = parse_wrk(local_fixture!("wrk-gunicorn.txt")).unwrap();
        assert_eq!((r.requests, r.errors, r.non_2xx), (16_401, 0, 0));
        assert_eq!(r.rps, 3266.66);
        assert_eq!((r.p50_us, r.p99_us), (Some(756.0), Some(7700.0)));
    }

    #[test]
    fn hey_outputs() {
        let r = parse_hey(fixture!("hey-5k.txt")).unwrap();
        assert_eq!((r.requests, r.errors, r.non_2xx), (24_944, 0, 0));
        assert!((r.rps - 24_944.0 / 5.0017).abs() < 1e-6, "{}", r.rps);
        assert!((r.p50_us.unwrap() - 200.0).abs() < 1e-6);
        assert!((r.p99_us.unwrap() - 1000.0).abs() < 1e-6);
        let r = parse_hey(fixture!("hey-404.txt")).unwrap();
        assert_eq!((r.requests, r.non_2xx), (200, 200));
        let r = parse_hey(fixture!("hey-refused.txt")).unwrap();
        assert_eq!((r.requests, r.errors, r.rps, r.p50_us), (0, 40, 0.0, None));
    }

    #[test]
    fn ab_outputs() {
        let r = parse_ab(local_fixture!("ab-http.txt"), local_fixture!("ab-http.csv")).unwrap();
        assert_eq!(
            r,
            LoadResult {
                requests: 109_959,
                rps: 21_991.27,
                p50_us: Some(695.0),
                p99_us: Some(1165.0),
                errors: 0,
                non_2xx: 0,
                body_bytes: None,
            }
        );
        let r = parse_ab(
            local_fixture!("ab-https.txt"),
            local_fixture!("ab-https.csv"),
        )
        .unwrap();
        assert_eq!((r.requests, r.rps, r.errors), (10_722, 2144.32, 0));
        assert!((r.p50_us.unwrap() - 7331.0).abs() < 1e-6);
        assert!((r.p99_us.unwrap() - 11_011.0).abs() < 1e-6);
        // A 404 for every request: counted as non-2xx, not as failed.
        let r = parse_ab(
            local_fixture!("ab-404.txt"),
            "0,0.1\n50,0.2\n99,0.3\n100,0.4\n",
        )
        .unwrap();
        assert_eq!((r.requests, r.non_2xx, r.errors), (200, 200, 0));
        // Failed requests with their breakdown on the same line.
        let text = "Complete requests:      500\nFailed requests:        7\n   (Connect: 0, Receive: 0, Length: 7, Exceptions: 0)\nRequests per second:    100.50 [#/sec] (mean)\n";
        let r = parse_ab(text, "50,1.5\n99,2.5\n").unwrap();
        assert_eq!(
            (r.requests, r.errors, r.rps, r.p50_us, r.p99_us),
            (500, 7, 100.5, Some(1500.0), Some(2500.0))
        );
        // Nothing answered: no report at all.
        assert!(parse_ab(local_fixture!("ab-refused.txt"), "").is_err());
        // A report without percentiles is an error (the CSV was not written).
        assert!(parse_ab(local_fixture!("ab-http.txt"), "").is_err());
        assert!(
            parse_ab(
                local_fixture!("ab-http.txt"),
                "Percentage served,Time in ms\n0,0.5\n100,1.0\n"
            )
            .is_err()
        );
    }

    #[test]
    fn ab_csv() {
        let rows = parse_ab_csv(local_fixture!("ab-http.csv")).unwrap();
        assert_eq!(rows.len(), 101);
        assert_eq!(rows[0], (0, 0.523));
        assert_eq!(rows[100], (100, 4.902));
        assert!(parse_ab_csv("Percentage served,Time in ms\n50;0.5\n").is_err());
        assert!(parse_ab_csv("Percentage served,Time in ms\n").is_err());
    }

    /// Real output captured from h2load (nghttp2 1.52.0) against nginx 1.22
    /// (`http2` listeners) and Debian's python3-grpcio 1.51 server.
    #[test]
    fn h2load_outputs() {
        let log_line = "1796402506942642\t200\t150\n";
        // h2c, prior knowledge, 3 s, 80 streams in flight at the end (not counted).
        let r = parse_h2load(local_fixture!("h2load-h2c.txt"), log_line).unwrap();
        assert_eq!(
            r,
            LoadResult {
                requests: 139_312,
                rps: 46_437.33,
                p50_us: Some(150.0),
                p99_us: Some(150.0),
                errors: 0,
                non_2xx: 0,
                body_bytes: Some(5_851_104),
            }
        );
        assert_eq!(
            h2load_protocol(local_fixture!("h2load-h2c.txt")),
            Some("h2c")
        );
        // Over TLS, ALPN h2.
        let text = local_fixture!("h2load-h2-tls.txt");
        let r = parse_h2load(text, log_line).unwrap();
        assert_eq!((r.requests, r.rps, r.errors), (156_792, 52_264.0, 0));
        assert_eq!(h2load_protocol(text), Some("h2"));
        // gRPC unary with its request log: 22-byte messages back.
        let r = parse_h2load(
            local_fixture!("h2load-grpc.txt"),
            local_fixture!("h2load-grpc-requests.tsv"),
        )
        .unwrap();
        assert_eq!((r.requests, r.rps, r.non_2xx), (22_997, 7665.67, 0));
        assert_eq!((r.p50_us, r.p99_us), (Some(2749.0), Some(3441.0)));
        assert_eq!(grpc_responses_without_message(&r, 22), Some(0));
        // A method the server does not have: 200s with no message (trailers only).
        let r = parse_h2load(local_fixture!("h2load-grpc-unimplemented.txt"), log_line).unwrap();
        assert_eq!((r.requests, r.non_2xx, r.body_bytes), (5, 0, Some(0)));
        assert_eq!(grpc_responses_without_message(&r, 22), Some(5));
        // nginx closed each connection after 1000 requests (GOAWAY): the
        // streams in flight then are errors, and h2load does not reconnect.
        let r = parse_h2load(local_fixture!("h2load-goaway.txt"), log_line).unwrap();
        assert_eq!((r.requests, r.errors), (8000, 59));
        assert!((r.rps - 4000.0 * 8000.0 / 8059.0).abs() < 1e-6, "{}", r.rps);
        // 404s: failed for h2load, non-2xx here.
        let r = parse_h2load(local_fixture!("h2load-404.txt"), log_line).unwrap();
        assert_eq!((r.requests, r.non_2xx, r.errors), (10, 10, 0));
        // Nothing listening: h2load exits 0 with an empty report.
        let text = local_fixture!("h2load-refused.txt");
        let r = parse_h2load(text, "").unwrap();
        assert_eq!((r.requests, r.rps, r.p50_us), (0, 0.0, None));
        assert_eq!(h2load_protocol(text), None);
        // Responses but no request log is an error; so is no report.
        assert!(parse_h2load(local_fixture!("h2load-h2c.txt"), "").is_err());
        assert!(parse_h2load("starting benchmark...\n", "").is_err());
    }

    /// Real output captured from h2load (nghttp2 1.52.0) against the
    /// grpc-go 1.33 server (`tests/go/grpcgo`, go1.19) over TLS 1.3.
    #[test]
    fn h2load_grpcgo_outputs() {
        // Unary calls, "hello periscope bench" back: 26 bytes of DATA each.
        let text = local_fixture!("h2load-grpcgo.txt");
        let r = parse_h2load(text, local_fixture!("h2load-grpcgo-requests.tsv")).unwrap();
        assert_eq!(
            (r.requests, r.rps, r.errors, r.non_2xx, r.body_bytes),
            (207_688, 69_229.33, 0, 0, Some(5_399_888))
        );
        assert_eq!((r.p50_us, r.p99_us), (Some(577.0), Some(4793.0)));
        assert_eq!(h2load_protocol(text), Some("h2"));
        assert_eq!(grpc_responses_without_message(&r, 26), Some(0));
        // A name starting with "missing": NOT_FOUND, a 200 with the status
        // in the trailers and no message.
        let text = local_fixture!("h2load-grpcgo-notfound.txt");
        let r = parse_h2load(text, "1796426119077428\t200\t4765\n").unwrap();
        assert_eq!((r.requests, r.non_2xx, r.body_bytes), (20, 0, Some(0)));
        assert_eq!(grpc_responses_without_message(&r, 26), Some(20));
    }

    #[test]
    fn grpcgo_reply() {
        let out = "reply periscope bench OK\nreply missing-x NotFound\n";
        assert_eq!(grpcgo_reply_code(out, "periscope bench"), Some("OK"));
        assert_eq!(grpcgo_reply_code(out, "missing-x"), Some("NotFound"));
        assert_eq!(grpcgo_reply_code(out, "periscope"), None);
        assert_eq!(
            grpcgo_reply_code("reply x Unavailable\r\n", "x"),
            Some("Unavailable")
        );
        assert_eq!(grpcgo_reply_code("reply x \n", "x"), None);
        assert_eq!(grpcgo_reply_code("", "x"), None);
    }

    #[test]
    fn h2load_log_and_percentiles() {
        let v = parse_h2load_log(local_fixture!("h2load-grpc-requests.tsv")).unwrap();
        assert_eq!(v.len(), 200);
        assert!(parse_h2load_log("1\t200\n").is_err());
        assert!(parse_h2load_log("\n").is_err());
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), Some(50.0));
        assert_eq!(percentile(&mut v, 99.0), Some(99.0));
        assert_eq!(percentile(&mut v, 100.0), Some(100.0));
        assert_eq!(percentile(&mut [7.0], 50.0), Some(7.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }

    #[test]
    fn stop_line() {
        let l = "[2025-06-01T10:00:00Z INFO  periscope] stopped: 1200 events, 400 spans built, 398 exported, 2 dropped, 7 events lost in kernel";
        assert_eq!(
            parse_stop_line(l),
            Some(StopLine {
                events: 1200,
                spans_built: 400,
                exported: 398,
                dropped: 2,
                lost: 7,
                request_spans: None
            })
        );
        let l = "stopped: 1200 events, 400 spans built, 398 exported, 2 dropped, 7 events lost in kernel, 100 request spans";
        assert_eq!(parse_stop_line(l).unwrap().request_spans, Some(100));
        assert_eq!(
            parse_stop_line("periscope ready: 9 kernel programs attached"),
            None
        );
        assert_eq!(parse_stop_line("stopped: 1 events, 2 spans built"), None);
    }

    #[test]
    fn rotel_lines() {
        // Colours on (captured), colours off (NO_COLOR), and other lines.
        let log = local_fixture!("rotel-basic.log");
        let counts: Vec<u64> = log.lines().filter_map(parse_rotel_spans).collect();
        assert_eq!(counts, vec![6]);
        assert_eq!(
            parse_rotel_spans(
                "2026-11-25T02:02:25.594898Z  INFO Received traces. data_type=\"traces\" resource_spans=3 spans=512"
            ),
            Some(512)
        );
        assert_eq!(
            parse_rotel_spans(
                "2026-11-25T02:02:17Z  INFO Starting Rotel. grpc_endpoint=\"127.0.0.1:1\""
            ),
            None
        );
        assert_eq!(
            parse_rotel_spans("INFO Received metrics. data_type=\"metrics\" metrics=4"),
            None
        );
        assert_eq!(
            strip_ansi("\u{1b}[3mspans\u{1b}[0m\u{1b}[2m=\u{1b}[0m6"),
            "spans=6"
        );
    }

    #[test]
    fn tls_calls_line() {
        let (calls, cpu) =
            parse_tls_calls("noise\ntls-calls 200000 cpu_s 2.593399 version TLSv1.3\n").unwrap();
        assert_eq!((calls, cpu), (200_000, 2.593399));
        assert!(parse_tls_calls("tls-calls x\n").is_err());
        assert!(parse_tls_calls("").is_err());
    }

    #[test]
    fn proc_stat() {
        // A comm with spaces and parentheses.
        let stat = "1234 (tokio (x) 1) S 1 1234 1234 0 -1 4194560 2000 0 0 0 150 37 0 0 20 0 3 0 100 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(187));
        // A thread's line (/proc/PID/task/TID/stat) has the same fields.
        let thread = "2211 (periscope-io) S 1 2200 2200 0 -1 4194368 90 0 0 0 41 12 0 0 20 0 4 0 5000 900000000 8000 18446744073709551615";
        assert_eq!(parse_stat_ticks(thread), Some(53));
        assert_eq!(
            parse_stat_ticks("2211 (x) S 1 2 3 4 5 6 7 8 9 10 x 12"),
            None
        );
        assert_eq!(parse_stat_ticks("1234 (x) S 1"), None);
    }

    #[test]
    fn fdinfo() {
        // A program fd while kernel.bpf_stats_enabled is 1 (6.18).
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2087\nprog_type:\t5\n\
                    prog_jited:\t1\nprog_tag:\t8f9cd35e4ab1a4f0\nmemlock:\t4096\nprog_id:\t412\n\
                    run_time_ns:\t123456789\nrun_cnt:\t98765\nrecursion_misses:\t0\nverified_insns:\t1234\n";
        assert_eq!(
            parse_fdinfo_prog(prog),
            Some(ProgStats {
                id: 412,
                run_time_ns: 123_456_789,
                run_cnt: 98_765
            })
        );
        // A link and a map have no run counters; odd values are not a program.
        let link = "pos:\t0\nflags:\t02000000\nlink_type:\tperf\nlink_id:\t7\nprog_tag:\tab\nprog_id:\t412\n";
        assert_eq!(parse_fdinfo_prog(link), None);
        assert_eq!(
            parse_fdinfo_prog("map_type:\t27\nmax_entries:\t262144\n"),
            None
        );
        assert_eq!(
            parse_fdinfo_prog("prog_id:\tx\nrun_time_ns:\t1\nrun_cnt:\t1\n"),
            None
        );
        assert_eq!(parse_fdinfo_prog(""), None);
    }

    #[test]
    fn perf_stat_csv() {
        let vm = "<not supported>,,cycles,0,100.00,,\n";
        assert!(!perf_stat_counted(vm, "cycles"));
        let hw = "1234567,,cycles,1000,100.00,,\n";
        assert!(perf_stat_counted(hw, "cycles"));
        assert!(!perf_stat_counted(hw, "instructions"));
        assert!(!perf_stat_counted("", "cycles"));
    }

    #[test]
    fn perf_record_line() {
        let out = "[ perf record: Woken up 110 times to write data ]\nWarning:\nProcessed 4826 events and lost 2 chunks!\n\
                   [ perf record: Captured and wrote 27.523 MB /r/logs/perf.data (3406 samples) ]\n";
        assert_eq!(parse_perf_record_samples(out), Some(3406));
        assert_eq!(
            parse_perf_record_samples("[ perf record: Captured and wrote 0.1 MB x ]"),
            None
        );
        assert_eq!(parse_perf_record_samples(""), None);
    }

    #[test]
    fn go_server_port() {
        assert_eq!(parse_listening("listening 41234"), Some(41234));
        assert_eq!(parse_listening("listening 41234\r"), Some(41234));
        assert_eq!(parse_listening("listening 0"), None);
        assert_eq!(parse_listening("listening on :8443"), None);
        assert_eq!(parse_listening("usage: httpsgo serve CERT KEY"), None);
    }

    #[test]
    fn noop_flag() {
        assert!(noop_flag_accepted(true, ""));
        assert!(!noop_flag_accepted(
            false,
            "error: unexpected argument '--noop-probes' found\n\nUsage: periscope run [OPTIONS]"
        ));
    }
}
