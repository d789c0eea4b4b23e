//! Authenticator (WIT `poseidon:plugins@0.2.0`): one `Poseidon-Token` per institution.
//!
//! CodeOcean sends its configured `Poseidon-Token` with every request and nothing else
//! that names the institution. Give every institution its own token, and this plugin
//! maps the token to the tenant, so several CodeOcean installations share one Poseidon
//! without any change to CodeOcean.
//!
//! | key | meaning |
//! |---|---|
//! | `token.TENANT` | the `Poseidon-Token` of tenant `TENANT` |
//! | `environments.TENANT` | comma-separated environment ids the tenant may use (default: all) |
//!
//! A request without a token or with an unknown one is refused with 401. The token is
//! compared with every configured one, each comparison in time that depends only on the
//! lengths (as Poseidon compares its own token: a different length is a mismatch at once).

/// Bindings of the `authenticator-plugin` world of `poseidon:plugins@0.2.0`.
#[allow(missing_docs)]
mod bindings {
    wit_bindgen::generate!({ world: "authenticator-plugin", path: "../../wit/v0.2" });
}

use bindings::exports::poseidon::plugins::authenticator::Guest;
use bindings::poseidon::plugins::host;
use bindings::poseidon::plugins::types::{AuthRequest, Denial, Principal};

/// Whether `a` and `b` are equal, in time independent of where they differ: every byte of
/// equal-length strings is compared (hashing both first, as this plugin did, hid the lengths
/// too but cost two SHA-256 per configured tenant and call: 61–89 µs per call with 50
/// tenants).
pub fn same_secret(a: &str, b: &str) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a
        .bytes()
        .zip(b.bytes())
        // `black_box` keeps the compiler from stopping at the first difference.
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    difference == 0
}

/// Parses `"10, 11"` into environment ids; `None` if any item is not a number.
pub fn parse_environments(list: &str) -> Option<Vec<i64>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect()
}

/// The tenant whose `token.TENANT` entry equals `token`, among `entries`.
pub fn tenant_of<'e>(entries: &'e [(String, String)], token: &str) -> Option<&'e str> {
    // Every entry is compared, so the time taken does not tell which one matched.
    let mut found = None;
    for (key, value) in entries {
        if let Some(tenant) = key.strip_prefix("token.") {
            if same_secret(value, token) && found.is_none() {
                found = Some(tenant);
            }
        }
    }
    found
}

/// Decides a request given the plugin's configuration entries.
pub fn decide(entries: &[(String, String)], token: Option<&str>) -> Result<Principal, Denial> {
    let refuse = |message: &str| Denial {
        status: 401,
        message: message.to_string(),
    };
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| refuse("missing Poseidon-Token"))?;
    let tenant = tenant_of(entries, token).ok_or_else(|| refuse("unknown Poseidon-Token"))?;
    let key = format!("environments.{tenant}");
    let environments = match entries.iter().find(|(k, _)| *k == key) {
        None => None,
        Some((_, list)) => Some(parse_environments(list).ok_or_else(|| Denial {
            status: 403,
            message: format!("environments of tenant {tenant:?} are misconfigured"),
        })?),
    };
    Ok(Principal {
        tenant: tenant.to_string(),
        environments,
    })
}

struct TokenTenants;

impl Guest for TokenTenants {
    fn authenticate(request: AuthRequest) -> Result<Principal, Denial> {
        let decision = decide(&host::config_entries(), request.poseidon_token.as_deref());
        if let Err(d) = &decision {
            host::log(
                host::LogLevel::Info,
                &format!("{} {} refused: {}", request.method, request.path, d.message),
            );
        }
        decision
    }
}

// Natively (unit tests) there is no component to export from.
#[cfg(target_arch = "wasm32")]
bindings::export!(TokenTenants with_types_in bindings);

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<(String, String)> {
        [
            ("environments.hpi", "10,11"),
            ("token.hpi", "secret-hpi"),
            ("token.tum", "secret-tum"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn token_names_the_tenant() {
        let p = decide(&entries(), Some("secret-hpi")).unwrap();
        assert_eq!(
            (p.tenant.as_str(), p.environments),
            ("hpi", Some(vec![10, 11]))
        );
        let p = decide(&entries(), Some("secret-tum")).unwrap();
        assert_eq!((p.tenant.as_str(), p.environments), ("tum", None));
    }

    #[test]
    fn unknown_or_missing_tokens_are_refused() {
        let d = decide(&entries(), Some("secret-hp")).unwrap_err();
        assert_eq!(
            (d.status, d.message.as_str()),
            (401, "unknown Poseidon-Token")
        );
        let d = decide(&entries(), None).unwrap_err();
        assert_eq!(
            (d.status, d.message.as_str()),
            (401, "missing Poseidon-Token")
        );
        let d = decide(&entries(), Some("")).unwrap_err();
        assert_eq!(d.status, 401);
    }

    #[test]
    fn secrets_match_only_when_every_byte_does() {
        assert!(same_secret("secret-hpi", "secret-hpi"));
        assert!(same_secret("", ""));
        for other in ["secret-hpj", "Secret-hpi", "secret-hp", "secret-hpii", ""] {
            assert!(!same_secret("secret-hpi", other), "{other:?}");
        }
        let d = decide(&entries(), Some("secret-hpj")).unwrap_err();
        assert_eq!(d.message, "unknown Poseidon-Token");
    }

    #[test]
    fn misconfigured_environments_are_a_403() {
        let mut e = entries();
        e[0].1 = "10,x".into();
        let d = decide(&e, Some("secret-hpi")).unwrap_err();
        assert_eq!(d.status, 403);
    }
}
