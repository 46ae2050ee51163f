//! Collect every mismatch of a test before failing, then fail once with all of
//! them and the spans involved: one run tells everything that is wrong.

use crate::span::{AttrValue, Span, StatusCode, dump};
use anyhow::{Result, bail};

#[derive(Default)]
pub struct Expect {
    failures: Vec<String>,
}

fn short(s: &Span) -> String {
    format!(
        "{:?} {} {:?} span {} [{} pid {}]",
        s.kind,
        s.name,
        s.path().unwrap_or("-"),
        s.span_id,
        s.service_name().unwrap_or("?"),
        s.pid().map(|p| p.to_string()).unwrap_or("?".into())
    )
}

impl Expect {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record `msg` unless `ok`.
    pub fn that(&mut self, ok: bool, msg: impl FnOnce() -> String) -> bool {
        if !ok {
            self.failures.push(msg());
        }
        ok
    }

    pub fn fail(&mut self, msg: impl Into<String>) {
        self.failures.push(msg.into());
    }

    pub fn attr_str(&mut self, s: &Span, key: &str, want: &str) {
        let got = s.attr(key);
        self.that(got == Some(&AttrValue::Str(want.to_string())), || {
            format!("{}: {key} = {got:?}, want Str({want:?})", short(s))
        });
    }

    pub fn attr_int(&mut self, s: &Span, key: &str, want: i64) {
        let got = s.attr(key);
        self.that(got == Some(&AttrValue::Int(want)), || {
            format!("{}: {key} = {got:?}, want Int({want})", short(s))
        });
    }

    /// The attribute exists (any value).
    pub fn attr_present(&mut self, s: &Span, key: &str) {
        self.that(s.attr(key).is_some(), || {
            format!("{}: attribute {key} is missing", short(s))
        });
    }

    pub fn attr_absent(&mut self, s: &Span, key: &str) {
        let got = s.attr(key);
        self.that(got.is_none(), || {
            format!("{}: unexpected attribute {key} = {got:?}", short(s))
        });
    }

    pub fn res_str(&mut self, s: &Span, key: &str, want: &str) {
        let got = s.resource.get(key);
        self.that(got == Some(&AttrValue::Str(want.to_string())), || {
            format!("{}: resource {key} = {got:?}, want Str({want:?})", short(s))
        });
    }

    pub fn res_int(&mut self, s: &Span, key: &str, want: i64) {
        let got = s.resource.get(key);
        self.that(got == Some(&AttrValue::Int(want)), || {
            format!("{}: resource {key} = {got:?}, want Int({want})", short(s))
        });
    }

    pub fn status(&mut self, s: &Span, error: bool) {
        let ok = if error {
            s.status.code == StatusCode::Error
        } else {
            s.status.code != StatusCode::Error
        };
        self.that(ok, || {
            format!(
                "{}: status {:?}, want {}",
                short(s),
                s.status,
                if error { "ERROR" } else { "not ERROR" }
            )
        });
    }

    /// `|got - want| <= rel * want + abs`, all in milliseconds.
    pub fn close_ms(&mut self, what: &str, s: &Span, got: f64, want: f64, rel: f64, abs: f64) {
        let tol = rel * want.abs() + abs;
        self.that((got - want).abs() <= tol, || {
            format!(
                "{}: {what}: {got:.3} ms, want {want:.3} ms ± {tol:.3} ms ({:.0}% + {abs} ms)",
                short(s),
                rel * 100.0
            )
        });
    }

    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }

    /// The mismatches recorded so far (e.g. to report only the first few of
    /// many similar spans).
    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// Fail with every recorded mismatch and `spans`.
    pub fn finish(self, spans: &[Span]) -> Result<()> {
        if self.failures.is_empty() {
            return Ok(());
        }
        let mut msg = format!("{} expectation(s) failed:\n", self.failures.len());
        for f in &self.failures {
            msg.push_str("  - ");
            msg.push_str(f);
            msg.push('\n');
        }
        msg.push_str(&format!(
            "spans received ({}):\n{}",
            spans.len(),
            dump(spans, 300)
        ));
        bail!(msg)
    }
}
