//! A Poseidon authenticator plugin (WIT poseidon:plugins@0.2.0, see wit/plugins.wit).

mod bindings {
    wit_bindgen::generate!({ world: "authenticator-plugin", path: "wit" });
}

use bindings::exports::poseidon::plugins::authenticator::Guest;
use bindings::poseidon::plugins::host;
use bindings::poseidon::plugins::types::{AuthRequest, Denial, Principal};

struct Plugin;

impl Guest for Plugin {
    /// The tenant whose `token.TENANT` configuration value is the request's Poseidon-Token.
    fn authenticate(request: AuthRequest) -> Result<Principal, Denial> {
        let token = request.poseidon_token.unwrap_or_default();
        let mut tenant = None;
        // Every entry is compared, each in time independent of where it differs (`==` stops
        // at the first difference, which tells a guesser how much of a token was right).
        for (key, value) in host::config_entries() {
            if let Some(name) = key.strip_prefix("token.") {
                if same_secret(&value, &token) && tenant.is_none() {
                    tenant = Some(name.to_string());
                }
            }
        }
        match tenant {
            Some(tenant) if !token.is_empty() => Ok(Principal {
                tenant,
                environments: None,
            }),
            _ => Err(Denial {
                status: 401,
                message: "unknown Poseidon-Token".into(),
            }),
        }
    }
}

/// Whether `a` and `b` are equal: every byte is compared (a different length is a mismatch at once).
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)))
            == 0
}

bindings::export!(Plugin with_types_in bindings);
