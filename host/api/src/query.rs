//! Query parameters: Go-style booleans and clear errors for anything malformed.

use std::collections::HashMap;

use crate::error::ApiError;

/// Decodes a raw query string; 400 if a parameter is not valid UTF-8 after percent-decoding.
pub(crate) fn params(raw: Option<String>) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    let Some(raw) = raw else { return Ok(out) };
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name)
            .ok_or_else(|| ApiError::bad_request("a query parameter name is not valid UTF-8"))?;
        let value = decode(value).ok_or_else(|| {
            ApiError::bad_request(format!("the query parameter {name} is not valid UTF-8"))
        })?;
        out.insert(name, value);
    }
    Ok(out)
}

/// Percent-decoding (`+` is a space); `None` if the result is not UTF-8.
fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// A boolean parameter parsed like Go's `strconv.ParseBool`; absent gives `default`, present
/// with an empty value (`?fetch=`) is 400 like any other value that is not a boolean.
pub(crate) fn boolean(
    params: &HashMap<String, String>,
    name: &str,
    default: bool,
) -> Result<bool, ApiError> {
    match params.get(name).map(String::as_str) {
        None => Ok(default),
        Some("1" | "t" | "T" | "TRUE" | "true" | "True") => Ok(true),
        Some("0" | "f" | "F" | "FALSE" | "false" | "False") => Ok(false),
        Some(other) => Err(ApiError::bad_request(format!(
            "could not parse {name} parameter: {other:?} is not a boolean"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_refuses_invalid_utf8() {
        let p = params(Some("path=a%20b+c&x=%C3%A9&bad%".into())).unwrap();
        assert_eq!(p["path"], "a b c");
        assert_eq!(p["x"], "é");
        assert!(params(Some("path=%FF".into())).is_err());
    }
}
