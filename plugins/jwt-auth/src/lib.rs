//! Authenticator: HS256 JSON Web Tokens from `Authorization: Bearer <token>`, with a
//! key and the allowed environments per tenant.
//!
//! The tenant is named by a claim of the token (`iss` by default); the token must be
//! signed with that tenant's key (HMAC-SHA256, `alg: HS256`; every other algorithm is
//! refused). `exp` is required unless `requireExp` is `false`; `exp` and `nbf` are
//! checked with `leewaySeconds` of tolerance.
//!
//! Configuration:
//!
//! | key | meaning |
//! |---|---|
//! | `key.TENANT` | the tenant's HS256 key (UTF-8 text) |
//! | `keyBase64.TENANT` | the tenant's key, base64 (standard or URL-safe) |
//! | `environments.TENANT` | comma-separated environment ids the tenant may use; absent or `*` = all |
//! | `tenantClaim` | claim naming the tenant, default `iss` |
//! | `audience` | if set, the token's `aud` must be or contain it |
//! | `leewaySeconds` | clock tolerance for `exp`/`nbf`, default `30` |
//! | `requireExp` | default `true` |
//!
//! A call reads only the entries of its token's tenant, so it costs the same with one tenant
//! or hundreds, and a tenant's unusable entry (a key that is empty or not base64, an
//! environment that is not a number) refuses that tenant's tokens only, with "authenticator
//! misconfigured: …" (401).
//!
//! ```yaml
//! config:
//!   key.codeocean: "a long random secret"
//!   environments.codeocean: "10, 11, 29"
//! ```

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use poseidon_plugin_api::{
    config, export_authenticator, AuthRequest, Authenticator, Denial, Principal,
};
use serde_json::Value;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The plugin's configuration, read key by key: a call looks up only the keys of the token's
/// tenant, so its cost does not grow with the number of tenants configured, and one tenant's
/// bad entry refuses only that tenant's tokens.
pub trait Config {
    /// The value of `key`, if configured.
    fn value(&self, key: &str) -> Option<String>;
}

/// The configuration the host gives the plugin (one host call per key read).
pub struct PluginConfig;

impl Config for PluginConfig {
    fn value(&self, key: &str) -> Option<String> {
        config::get(key)
    }
}

/// Configuration entries at hand (tests, tooling).
impl Config for [(String, String)] {
    fn value(&self, key: &str) -> Option<String> {
        self.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }
}

/// A tenant's key and permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// HS256 key.
    pub key: Vec<u8>,
    /// Allowed environments; `None` = all.
    pub environments: Option<Vec<i64>>,
}

impl Tenant {
    /// Reads tenant `name` from `config`: `None` if it has no key (`key.NAME`, or else
    /// `keyBase64.NAME`), an error if one of its entries is unusable.
    pub fn read(name: &str, config: &(impl Config + ?Sized)) -> Result<Option<Tenant>, String> {
        let key = if let Some(text) = config.value(&format!("key.{name}")) {
            text.into_bytes()
        } else if let Some(encoded) = config.value(&format!("keyBase64.{name}")) {
            decode_b64(&encoded).ok_or_else(|| format!("keyBase64.{name} is not base64"))?
        } else {
            return Ok(None);
        };
        if key.is_empty() {
            return Err(format!("the key of tenant {name:?} is empty"));
        }
        let environments = match config.value(&format!("environments.{name}")) {
            None => None,
            Some(list) if list.trim() == "*" => None,
            Some(list) => Some(
                list.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse::<i64>()
                            .map_err(|_| format!("environments.{name}: {s:?} is not an id"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        Ok(Some(Tenant { key, environments }))
    }
}

/// The settings that apply to every tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Claim naming the tenant.
    pub tenant_claim: String,
    /// Required audience.
    pub audience: Option<String>,
    /// Clock tolerance in seconds.
    pub leeway: i64,
    /// Whether `exp` is required.
    pub require_exp: bool,
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim().trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(s))
        .ok()
}

/// A token split into its three parts, its header checked and its claims decoded: what can
/// be refused before the configuration is read.
pub struct Token<'a> {
    header_b64: &'a str,
    payload_b64: &'a str,
    signature_b64: &'a str,
    claims: Value,
}

impl<'a> Token<'a> {
    /// The request's bearer token, parsed (a missing one is refused).
    pub fn from_request(request: &'a AuthRequest) -> Result<Self, Denial> {
        let token = request
            .bearer_token()
            .ok_or_else(|| Denial::unauthorized("missing bearer token"))?;
        Self::parse(token)
    }

    /// Splits `token` (JWS compact), checks that it is HS256 and decodes its claims.
    pub fn parse(token: &'a str) -> Result<Self, Denial> {
        let invalid = |why: &str| Denial::unauthorized(format!("invalid token: {why}"));
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a JWS compact token"));
        };
        let header: Value = decode_b64(header_b64)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("bad header"))?;
        if header.get("alg").and_then(Value::as_str) != Some("HS256") {
            return Err(invalid("alg must be HS256"));
        }
        let claims: Value = decode_b64(payload_b64)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(Value::is_object)
            .ok_or_else(|| invalid("bad payload"))?;
        Ok(Token {
            header_b64,
            payload_b64,
            signature_b64,
            claims,
        })
    }
}

impl Settings {
    /// Reads the settings from `config`.
    pub fn read(config: &(impl Config + ?Sized)) -> Result<Self, String> {
        let leeway = match config.value("leewaySeconds") {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| "leewaySeconds is not a number")?,
            None => 30,
        };
        let require_exp = match config.value("requireExp") {
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| "requireExp is not true/false")?,
            None => true,
        };
        Ok(Settings {
            tenant_claim: config
                .value("tenantClaim")
                .unwrap_or_else(|| "iss".to_string()),
            audience: config.value("audience"),
            leeway,
            require_exp,
        })
    }

    /// Checks a parsed token against its tenant's key (read from `config`) and the time
    /// claims at Unix time `now`.
    pub fn check(
        &self,
        token: &Token<'_>,
        now: i64,
        config: &(impl Config + ?Sized),
    ) -> Result<Principal, Denial> {
        let invalid = |why: &str| Denial::unauthorized(format!("invalid token: {why}"));
        let Token {
            header_b64,
            payload_b64,
            signature_b64,
            claims,
        } = token;
        let tenant_name = claims
            .get(&self.tenant_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(&format!("no {} claim", self.tenant_claim)))?;
        let tenant = Tenant::read(tenant_name, config)
            .map_err(misconfigured)?
            .ok_or_else(|| invalid("unknown tenant"))?;
        let signature = decode_b64(signature_b64).ok_or_else(|| invalid("bad signature"))?;
        let mut mac = HmacSha256::new_from_slice(&tenant.key).map_err(|_| invalid("bad key"))?;
        mac.update(header_b64.as_bytes());
        mac.update(b".");
        mac.update(payload_b64.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&signature)
            .map_err(|_| invalid("signature mismatch"))?;

        let time_claim = |name: &str| -> Result<Option<i64>, Denial> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_i64()
                    .or_else(|| v.as_f64().map(|f| f as i64))
                    .map(Some)
                    .ok_or_else(|| invalid(&format!("{name} is not a number"))),
            }
        };
        match time_claim("exp")? {
            Some(exp) if now > exp.saturating_add(self.leeway) => {
                return Err(Denial::unauthorized("token expired"))
            }
            None if self.require_exp => return Err(invalid("no exp claim")),
            _ => {}
        }
        if let Some(nbf) = time_claim("nbf")? {
            if now < nbf.saturating_sub(self.leeway) {
                return Err(Denial::unauthorized("token not yet valid"));
            }
        }
        if let Some(aud) = &self.audience {
            let ok = match claims.get("aud") {
                Some(Value::String(s)) => s == aud,
                Some(Value::Array(list)) => list.iter().any(|v| v.as_str() == Some(aud)),
                _ => false,
            };
            if !ok {
                return Err(Denial::forbidden("token is not for this audience"));
            }
        }
        Ok(Principal {
            tenant: tenant_name.to_string(),
            environments: tenant.environments,
        })
    }

    /// Authenticates a request at Unix time `now`, the tenants' entries read from `config`.
    pub fn authenticate(
        &self,
        request: &AuthRequest,
        now: i64,
        config: &(impl Config + ?Sized),
    ) -> Result<Principal, Denial> {
        self.check(&Token::from_request(request)?, now, config)
    }
}

/// Creates an HS256 token for `claims` (a JSON object) signed with `key`. Useful for
/// tests and for tooling that issues tokens.
pub fn sign(claims: &Value, key: &[u8]) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = engine.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = engine.encode(claims.to_string());
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    let signature = engine.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

/// The refusal of a request that the configuration cannot decide.
fn misconfigured(why: String) -> Denial {
    Denial {
        status: 401,
        message: format!("authenticator misconfigured: {why}"),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The exported plugin.
pub struct JwtAuth;

impl Authenticator for JwtAuth {
    fn authenticate(request: AuthRequest) -> Result<Principal, Denial> {
        // A missing or malformed token is refused before the configuration is read.
        let token = Token::from_request(&request)?;
        let settings = Settings::read(&PluginConfig).map_err(misconfigured)?;
        settings.check(&token, unix_now(), &PluginConfig)
    }
}

export_authenticator!(JwtAuth);

#[cfg(test)]
mod tests {
    use super::*;
    use poseidon_plugin_api::testing::set_config;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;

    /// Settings and the entries they were read from.
    struct Fixture {
        settings: Settings,
        entries: Vec<(String, String)>,
    }

    impl Fixture {
        fn of(entries: &[(&str, &str)]) -> Self {
            let entries: Vec<(String, String)> = entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Fixture {
                settings: Settings::read(entries.as_slice()).unwrap(),
                entries,
            }
        }

        fn authenticate(&self, request: &AuthRequest, now: i64) -> Result<Principal, Denial> {
            self.settings
                .authenticate(request, now, self.entries.as_slice())
        }
    }

    fn settings() -> Fixture {
        Fixture::of(&[
            ("key.alpha", "alpha-secret"),
            ("environments.alpha", "10, 11"),
            ("keyBase64.beta", "YmV0YS1zZWNyZXQ="),
        ])
    }

    fn request(token: &str) -> AuthRequest {
        AuthRequest {
            method: "POST".into(),
            path: "/api/v1/runners".into(),
            headers: vec![("authorization".into(), format!("Bearer {token}"))],
            peer_address: "127.0.0.1:4000".into(),
        }
    }

    #[test]
    fn valid_tokens_give_principals() {
        let s = settings();
        let t = sign(&json!({"iss": "alpha", "exp": NOW + 60}), b"alpha-secret");
        let p = s.authenticate(&request(&t), NOW).unwrap();
        assert_eq!(p, Principal::with_environments("alpha", vec![10, 11]));
        let t = sign(&json!({"iss": "beta", "exp": NOW + 60}), b"beta-secret");
        assert_eq!(
            s.authenticate(&request(&t), NOW).unwrap(),
            Principal::tenant("beta")
        );
    }

    #[test]
    fn wrong_key_or_tenant_or_alg_is_refused() {
        let s = settings();
        let t = sign(&json!({"iss": "alpha", "exp": NOW + 60}), b"beta-secret");
        assert!(s
            .authenticate(&request(&t), NOW)
            .unwrap_err()
            .message
            .contains("signature"));
        let t = sign(&json!({"iss": "gamma", "exp": NOW + 60}), b"x");
        assert!(s
            .authenticate(&request(&t), NOW)
            .unwrap_err()
            .message
            .contains("unknown tenant"));
        // alg "none" with an empty signature.
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            e.encode(br#"{"alg":"none"}"#),
            e.encode(br#"{"iss":"alpha","exp":9999999999}"#)
        );
        assert!(s
            .authenticate(&request(&none), NOW)
            .unwrap_err()
            .message
            .contains("HS256"));
        assert_eq!(
            s.authenticate(&request("a.b"), NOW).unwrap_err().status,
            401
        );
    }

    #[test]
    fn tampered_payload_is_refused() {
        let s = settings();
        let t = sign(&json!({"iss": "alpha", "exp": NOW + 60}), b"alpha-secret");
        let parts: Vec<&str> = t.split('.').collect();
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            e.encode(br#"{"iss":"alpha","exp":9999999999}"#),
            parts[2]
        );
        assert!(s.authenticate(&request(&forged), NOW).is_err());
    }

    #[test]
    fn exp_and_nbf_with_leeway() {
        let s = settings();
        let key = b"alpha-secret";
        let expired = sign(&json!({"iss": "alpha", "exp": NOW - 31}), key);
        assert_eq!(
            s.authenticate(&request(&expired), NOW).unwrap_err().message,
            "token expired"
        );
        let within_leeway = sign(&json!({"iss": "alpha", "exp": NOW - 29}), key);
        assert!(s.authenticate(&request(&within_leeway), NOW).is_ok());
        let early = sign(
            &json!({"iss": "alpha", "exp": NOW + 600, "nbf": NOW + 60}),
            key,
        );
        assert_eq!(
            s.authenticate(&request(&early), NOW).unwrap_err().message,
            "token not yet valid"
        );
        let no_exp = sign(&json!({"iss": "alpha"}), key);
        assert!(s.authenticate(&request(&no_exp), NOW).is_err());
    }

    #[test]
    fn missing_header_and_audience() {
        let mut s = settings();
        let no_auth = AuthRequest {
            headers: vec![],
            ..request("x")
        };
        assert_eq!(
            s.authenticate(&no_auth, NOW).unwrap_err().message,
            "missing bearer token"
        );
        s.settings.audience = Some("poseidon".into());
        let key = b"alpha-secret";
        let wrong = sign(
            &json!({"iss": "alpha", "exp": NOW + 60, "aud": "other"}),
            key,
        );
        assert_eq!(
            s.authenticate(&request(&wrong), NOW).unwrap_err().status,
            403
        );
        let right = sign(
            &json!({"iss": "alpha", "exp": NOW + 60, "aud": ["x", "poseidon"]}),
            key,
        );
        assert!(s.authenticate(&request(&right), NOW).is_ok());
    }

    #[test]
    fn a_bad_entry_refuses_only_its_own_tenant() {
        let s = Fixture::of(&[
            ("key.alpha", "alpha-secret"),
            ("key.gamma", "gamma-secret"),
            ("environments.gamma", "x"),
            ("keyBase64.delta", "!!!"),
            ("key.epsilon", ""),
        ]);
        let token = |tenant: &str, key: &str| {
            sign(&json!({"iss": tenant, "exp": NOW + 60}), key.as_bytes())
        };
        assert_eq!(
            s.authenticate(&request(&token("alpha", "alpha-secret")), NOW)
                .unwrap(),
            Principal::tenant("alpha")
        );
        for (tenant, why) in [
            ("gamma", "environments.gamma: \"x\" is not an id"),
            ("delta", "keyBase64.delta is not base64"),
            ("epsilon", "the key of tenant \"epsilon\" is empty"),
        ] {
            let denial = s
                .authenticate(&request(&token(tenant, "whatever")), NOW)
                .unwrap_err();
            assert_eq!(
                (denial.status, denial.message),
                (401, format!("authenticator misconfigured: {why}"))
            );
        }
        assert!(
            Settings::read([("leewaySeconds".to_string(), "soon".to_string())].as_slice()).is_err()
        );
    }

    #[test]
    fn a_text_key_wins_over_a_base64_key_and_star_means_every_environment() {
        let s = Fixture::of(&[
            ("key.alpha", "alpha-secret"),
            ("keyBase64.alpha", "b3RoZXI="),
            ("environments.alpha", " * "),
        ]);
        let t = sign(&json!({"iss": "alpha", "exp": NOW + 60}), b"alpha-secret");
        assert_eq!(
            s.authenticate(&request(&t), NOW).unwrap(),
            Principal::tenant("alpha")
        );
    }

    #[test]
    fn plugin_reads_its_configuration() {
        set_config([("key.alpha", "alpha-secret")]);
        let t = sign(
            &json!({"iss": "alpha", "exp": unix_now() + 60}),
            b"alpha-secret",
        );
        assert_eq!(
            JwtAuth::authenticate(request(&t)).unwrap(),
            Principal::tenant("alpha")
        );
    }

    #[test]
    fn a_malformed_token_is_refused_before_the_configuration_is_read() {
        // An empty key makes the configuration unusable: only a well-formed token gets as far
        // as reading it.
        set_config([("key.alpha", "")]);
        let junk = JwtAuth::authenticate(request("a.b.c")).unwrap_err();
        assert_eq!(
            (junk.status, junk.message.as_str()),
            (401, "invalid token: bad header")
        );
        let t = sign(&json!({"iss": "alpha", "exp": unix_now() + 60}), b"x");
        let formed = JwtAuth::authenticate(request(&t)).unwrap_err();
        assert!(
            formed.message.contains("misconfigured"),
            "{}",
            formed.message
        );
    }
}
