//! The authenticator's decision cache: for an entry that declares what its decision depends
//! on (`cacheDecisions`), requests that agree on those inputs reuse the plugin's answer for a
//! while instead of calling it again — CodeOcean sends the same token with every request of
//! a run (claim, copy, execute, WebSocket), so most calls would repeat the last answer.
//!
//! Only the plugin's own answers are kept (a principal, or a 401/403 denial), never a failure.
//! The cache belongs to one loaded version with one `config:` (it lives in the version's
//! [`LoadedPlugin`](crate::loader::LoadedPlugin)), so a new file or new values start empty.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::DecisionCacheConfig;
use poseidon_core::policy::{AuthRequest, Denial, Principal};

/// The longest key kept (the inputs' values together): larger requests are always called.
const MAX_KEY_BYTES: usize = 8 * 1024;

/// The values of a request's declared inputs, in the declared order (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DecisionKey(Vec<Option<String>>);

impl DecisionKey {
    /// The key of `request` under `config`; `None` if its inputs are too large to keep.
    /// Input names are `:method`, `:path`, `:peer`, `poseidon-token` or a header name in
    /// lower case (several values of one header are joined by a NUL, which no header
    /// value holds).
    pub(crate) fn of(config: &DecisionCacheConfig, request: &AuthRequest) -> Option<Self> {
        let mut size = 0;
        let mut values = Vec::with_capacity(config.inputs.len());
        for input in &config.inputs {
            let value = match input.as_str() {
                ":method" => Some(request.method.clone()),
                ":path" => Some(request.path.clone()),
                ":peer" => request.peer_address.clone(),
                "poseidon-token" => request.poseidon_token.clone(),
                header => {
                    let found: Vec<&str> = request
                        .headers
                        .iter()
                        .filter(|(name, _)| name.eq_ignore_ascii_case(header))
                        .map(|(_, value)| value.as_str())
                        .collect();
                    (!found.is_empty()).then(|| found.join("\0"))
                }
            };
            size += value.as_ref().map_or(1, |v| v.len() + 1);
            if size > MAX_KEY_BYTES {
                return None;
            }
            values.push(value);
        }
        Some(DecisionKey(values))
    }
}

/// A decision of the plugin: who the caller is, or why it is refused.
pub(crate) type Decision = Result<Principal, Denial>;

/// Decisions by key, each until its expiry; at most `maxEntries` of them.
#[derive(Default)]
pub(crate) struct DecisionCache {
    entries: Mutex<HashMap<DecisionKey, (Decision, Instant)>>,
}

impl DecisionCache {
    /// The decision kept for `key`, if it has not expired at `now`.
    pub(crate) fn get(&self, key: &DecisionKey, now: Instant) -> Option<Decision> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(_, expires)| *expires > now)
            .map(|(decision, _)| decision.clone())
    }

    /// Keeps `decision` for `key` until `now + ttl`. When the cache is full, expired
    /// entries go first, then all of them (a flood of distinct keys cannot grow it).
    pub(crate) fn put(
        &self,
        key: DecisionKey,
        decision: Decision,
        now: Instant,
        config: &DecisionCacheConfig,
    ) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= config.max_entries && !entries.contains_key(&key) {
            entries.retain(|_, (_, expires)| *expires > now);
            if entries.len() >= config.max_entries {
                entries.clear();
            }
        }
        if config.max_entries > 0 {
            let ttl = Duration::from_millis(config.ttl_ms);
            entries.insert(key, (decision, now + ttl));
        }
    }

    /// Decisions kept, expired ones included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(inputs: &[&str], ttl_ms: u64, max_entries: usize) -> DecisionCacheConfig {
        DecisionCacheConfig {
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            ttl_ms,
            max_entries,
        }
    }

    fn request(path: &str, headers: &[(&str, &str)], token: Option<&str>) -> AuthRequest {
        AuthRequest {
            method: "POST".into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            peer_address: Some("127.0.0.1:4000".into()),
            poseidon_token: token.map(str::to_string),
        }
    }

    fn principal(tenant: &str) -> Decision {
        Ok(Principal {
            tenant: tenant.into(),
            environments: None,
        })
    }

    #[test]
    fn requests_agreeing_on_the_declared_inputs_share_a_key_and_no_others_do() {
        let c = config(&["authorization", "poseidon-token"], 1000, 10);
        let a = request(
            "/a",
            &[("authorization", "Bearer x"), ("x-other", "1")],
            Some("t"),
        );
        let b = request(
            "/b",
            &[("authorization", "Bearer x"), ("x-other", "2")],
            Some("t"),
        );
        assert_eq!(DecisionKey::of(&c, &a), DecisionKey::of(&c, &b));
        let other_token = request("/a", &[("authorization", "Bearer x")], Some("u"));
        assert_ne!(DecisionKey::of(&c, &a), DecisionKey::of(&c, &other_token));
        let other_header = request("/a", &[("authorization", "Bearer y")], Some("t"));
        assert_ne!(DecisionKey::of(&c, &a), DecisionKey::of(&c, &other_header));
        // An absent header is not the same as an empty one.
        let absent = request("/a", &[], Some("t"));
        let empty = request("/a", &[("authorization", "")], Some("t"));
        assert_ne!(DecisionKey::of(&c, &absent), DecisionKey::of(&c, &empty));
        // With `:path` declared, the path counts.
        let by_path = config(&[":path", "authorization"], 1000, 10);
        assert_ne!(DecisionKey::of(&by_path, &a), DecisionKey::of(&by_path, &b));
    }

    #[test]
    fn a_second_value_of_a_header_changes_the_key() {
        let c = config(&["authorization"], 1000, 10);
        let one = request("/", &[("authorization", "a")], None);
        let two = request("/", &[("authorization", "a"), ("authorization", "b")], None);
        assert_ne!(DecisionKey::of(&c, &one), DecisionKey::of(&c, &two));
    }

    #[test]
    fn oversized_inputs_are_not_cached() {
        let c = config(&["authorization"], 1000, 10);
        let big = "x".repeat(MAX_KEY_BYTES + 1);
        assert!(DecisionKey::of(&c, &request("/", &[("authorization", &big)], None)).is_none());
    }

    #[test]
    fn a_decision_is_reused_until_it_expires() {
        let c = config(&["authorization"], 1000, 10);
        let cache = DecisionCache::default();
        let key = DecisionKey::of(&c, &request("/", &[("authorization", "a")], None)).unwrap();
        let now = Instant::now();
        assert!(cache.get(&key, now).is_none());
        cache.put(key.clone(), principal("alpha"), now, &c);
        assert_eq!(
            cache.get(&key, now + Duration::from_millis(999)),
            Some(principal("alpha"))
        );
        assert!(cache.get(&key, now + Duration::from_millis(1000)).is_none());
        let denial: Decision = Err(Denial {
            status: 401,
            message: "no".into(),
        });
        cache.put(key.clone(), denial.clone(), now, &c);
        assert_eq!(cache.get(&key, now), Some(denial));
    }

    #[test]
    fn the_cache_never_holds_more_than_its_bound() {
        let c = config(&["authorization"], 1000, 3);
        let cache = DecisionCache::default();
        let now = Instant::now();
        let key = |i: usize| {
            DecisionKey::of(
                &c,
                &request("/", &[("authorization", &i.to_string())], None),
            )
            .unwrap()
        };
        for i in 0..3 {
            cache.put(key(i), principal("t"), now, &c);
        }
        assert_eq!(cache.len(), 3);
        // Full of live entries: the next one empties it first.
        cache.put(key(3), principal("t"), now, &c);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&key(3), now).is_some());
        // Expired entries are the first to go.
        let later = now + Duration::from_millis(1500);
        cache.put(key(4), principal("t"), later, &c);
        cache.put(key(5), principal("t"), later, &c);
        cache.put(key(6), principal("t"), later, &c);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&key(4), later).is_some());
        assert!(cache.get(&key(3), later).is_none());
    }
}
