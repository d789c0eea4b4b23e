//! JSON helpers reproducing Nomad's wire conventions (nomad-api.md §0).
//!
//! * case-insensitive key lookup on decode (Go `encoding/json`),
//! * struct-level `omitempty` on encode for `Allocation`, `Evaluation`, `Port`, ...,
//! * go-multierror rendering for validation failures,
//! * nanosecond timestamps and RFC 3339 times.

use serde_json::{Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// Looks up `key` in `obj` the way Go's `encoding/json` matches struct fields: an exact match
/// wins, otherwise the first case-insensitive match.
pub fn ci_get<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(key) {
        return Some(v);
    }
    obj.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

/// Like [`ci_get`] but treats JSON `null` as absent.
pub fn ci_get_nn<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    ci_get(obj, key).filter(|v| !v.is_null())
}

/// Whether a value is the Go zero value for the purpose of `omitempty`
/// (empty string, 0, false, null, empty array, empty object).
pub fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// Builder for JSON objects with an optional struct-level `omitempty`.
pub struct Obj {
    map: Map<String, Value>,
    omit_empty: bool,
}

impl Obj {
    /// An object that always carries every field.
    pub fn full() -> Self {
        Obj {
            map: Map::new(),
            omit_empty: false,
        }
    }

    /// An object that omits zero-valued fields.
    pub fn omit_empty() -> Self {
        Obj {
            map: Map::new(),
            omit_empty: true,
        }
    }

    /// Adds a field (skipped when zero and the object omits empty fields).
    pub fn put(mut self, key: &str, value: impl Into<Value>) -> Self {
        let value = value.into();
        if !(self.omit_empty && is_zero(&value)) {
            self.map.insert(key.to_string(), value);
        }
        self
    }

    /// Finishes the object.
    pub fn build(self) -> Value {
        Value::Object(self.map)
    }
}

/// Renders a go-multierror list: `"<N> error(s) occurred:\n\t* a\n\t* b\n\n"`.
pub fn multierror(errors: &[String]) -> String {
    let mut out = if errors.len() == 1 {
        "1 error occurred:\n".to_string()
    } else {
        format!("{} errors occurred:\n", errors.len())
    };
    for e in errors {
        out.push_str("\t* ");
        out.push_str(e);
        out.push('\n');
    }
    out.push('\n');
    out
}

/// Current Unix time in nanoseconds.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Formats Unix nanoseconds as an RFC 3339 UTC time with nanoseconds
/// (`2026-08-21T10:00:03.123456789Z`), the codec's `time.Time` encoding.
pub fn rfc3339(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        y,
        m,
        d,
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60,
        nanos
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `time.Time` encoding: zero → `null`, otherwise RFC 3339.
pub fn time_or_null(ns: Option<i64>) -> Value {
    match ns {
        Some(ns) => Value::String(rfc3339(ns)),
        None => Value::Null,
    }
}

/// Parses a Go duration string (`300ms`, `10s`, `5m`, `1h30m`) into nanoseconds.
pub fn parse_go_duration(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let num: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += num * mult;
    }
    Some(total as i64)
}

/// Formats nanoseconds like Go's `time.Duration.String()` for whole units (`1h0m0s`, `15s`).
pub fn go_duration_string(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let total_ms = ns / 1_000_000;
    if ns < 1_000_000_000 {
        return format!("{total_ms}ms");
    }
    let secs = ns / 1_000_000_000;
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let frac = (ns % 1_000_000_000) as f64 / 1e9;
    let s_str = if frac > 0.0 {
        let v = s as f64 + frac;
        let mut t = format!("{v:.9}");
        while t.ends_with('0') {
            t.pop();
        }
        t
    } else {
        s.to_string()
    };
    if h > 0 {
        format!("{h}h{m}m{s_str}s")
    } else if m > 0 {
        format!("{m}m{s_str}s")
    } else {
        format!("{s_str}s")
    }
}

/// The Go type-name of a JSON value as used in `json: cannot unmarshal <x> into ...`.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_epoch_and_known_date() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        // 2026-08-21T10:00:03.123456789Z
        assert_eq!(
            rfc3339(1_787_306_403_123_456_789),
            "2026-08-21T10:00:03.123456789Z"
        );
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_go_duration("300ms"), Some(300_000_000));
        assert_eq!(parse_go_duration("1h30m"), Some(5_400_000_000_000));
        assert_eq!(parse_go_duration("x"), None);
        assert_eq!(go_duration_string(3_600_000_000_000), "1h0m0s");
        assert_eq!(go_duration_string(15_000_000_000), "15s");
    }

    #[test]
    fn multierror_matches_go_format() {
        assert_eq!(
            multierror(&["Missing task driver".into()]),
            "1 error occurred:\n\t* Missing task driver\n\n"
        );
    }
}
