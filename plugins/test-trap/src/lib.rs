//! Test plugin: an authenticator that traps (panics) unless the request path is
//! `/ok`, for the host's containment tests.

use poseidon_plugin_api::{export_authenticator, AuthRequest, Authenticator, Denial, Principal};

/// The exported plugin.
pub struct Trap;

impl Authenticator for Trap {
    fn authenticate(request: AuthRequest) -> Result<Principal, Denial> {
        if request.path == "/ok" {
            return Ok(Principal::tenant("ok"));
        }
        panic!("test-trap: refusing to work on {}", request.path)
    }
}

export_authenticator!(Trap);
