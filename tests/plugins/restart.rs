//! With an authenticator, a claimed runner stays its tenant's across a restart of the server (a
//! deploy): the owner is recorded with the claim where the backend keeps runner state, and
//! restored when the runner is recovered. Each scenario runs on the local backend, on the Nomad
//! emulator, and (asked for) on a real Nomad.

use serde_json::{json, Value};

use super::support::{eventually, status_and_json, Backend, Server, Ws, TOKEN};
use super::{claim_as, codeocean, plugin_dir, plugin_options, plugins_yaml};

on_both_backends!(
    a_tenants_runner_stays_its_own_across_a_restart,
    a_runner_claimed_without_an_owner_is_left_to_the_tenants_of_its_environment
);

/// `token-tenants`: the operator (the server's token, every environment); hpi and tum, who may
/// both use environment 12, so that only a runner's owner tells them apart; uni, who may not.
fn tenants_entry() -> String {
    format!(
        "    - file: tokens.wasm\n      kind: authenticator\n      config:\n        token.ops: {TOKEN}\n        token.hpi: hpi-token\n        environments.hpi: \"12\"\n        token.tum: tum-token\n        environments.tum: \"12,13\"\n        token.uni: uni-token\n        environments.uni: \"13\"\n"
    )
}

/// A runner id no runner has.
const NO_RUNNER: &str = "12-00000000-0000-4000-8000-000000000000";

/// What `client` gets for `PATCH files`, `POST execute` and `DELETE` of the runner, in that
/// order: status and JSON body of each.
async fn answers(s: &Server, client: &reqwest::Client, runner: &str) -> Vec<(u16, Value)> {
    let base = s.url(&format!("/runners/{runner}"));
    let requests = [
        client
            .patch(format!("{base}/files"))
            .json(&json!({"copy": [{"path": "intruder.txt", "content": ""}]})),
        client
            .post(format!("{base}/execute"))
            .json(&json!({"command": "true"})),
        client.delete(&base),
    ];
    let mut out = Vec::new();
    for request in requests {
        out.push(status_and_json(request.send().await.unwrap()).await);
    }
    out
}

/// Asserts that `client` is refused the runner exactly as a runner that does not exist.
async fn assert_refused(s: &Server, client: &reqwest::Client, runner: &str, who: &str) {
    let got = answers(s, client, runner).await;
    let gone = answers(s, client, NO_RUNNER).await;
    assert_eq!(
        got, gone,
        "{who} is answered as for a runner that is not there"
    );
    assert!(
        got.iter().all(|(status, _)| *status == 410),
        "{who}: {got:?}"
    );
}

/// Waits until the backend recorded the runner's claim with this owner (a claim is recorded in
/// the background; a server killed before that would recover the runner as idle).
async fn claim_recorded(s: &Server, runner: &str, owner: Option<&str>) {
    let expected = Some(owner.map(str::to_string));
    eventually("the claim is recorded", 30, || {
        let recorded = s.recorded_claim(runner);
        let expected = expected.clone();
        async move { recorded.await == expected }
    })
    .await;
}

/// Copies one file (content in base64) into the runner as `client`.
async fn copy_as(s: &Server, client: &reqwest::Client, runner: &str, path: &str, base64: &str) {
    let r = client
        .patch(s.url(&format!("/runners/{runner}/files")))
        .json(&json!({"copy": [{"path": path, "content": base64}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
}

/// Claims a runner of environment 12 as `client` and copies `kept.txt` into it.
async fn claim_with_a_file(s: &Server, client: &reqwest::Client) -> String {
    let runner = claim_as(s, client, 12, 600).await;
    copy_as(s, client, &runner, "kept.txt", "a2VwdA==").await;
    runner
}

/// `client` (whose `Poseidon-Token` is `token`) uses the runner as its own: copies a file, runs
/// a program that reads the file kept from before the restart (so the runner is the one
/// recovered, not a new one) and the new one, and destroys it.
async fn assert_usable(s: &Server, client: &reqwest::Client, token: &str, runner: &str) {
    copy_as(s, client, runner, "new.txt", "bmV3").await;
    let (status, body) = status_and_json(
        client
            .post(s.url(&format!("/runners/{runner}/execute")))
            .json(&json!({"command": "cat kept.txt new.txt"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let url = body["websocketUrl"].as_str().unwrap();
    let session = Ws::connect_with_token(url, token).await.finish().await;
    assert_eq!(session.exit(), Some(0), "{session:?}");
    assert_eq!(session.stdout, "keptnew", "{session:?}");
    let delete = s.url(&format!("/runners/{runner}"));
    assert_eq!(client.delete(&delete).send().await.unwrap().status(), 204);
    assert_eq!(client.delete(&delete).send().await.unwrap().status(), 410);
}

async fn a_tenants_runner_stays_its_own_across_a_restart(backend: Backend) {
    let dir = plugin_dir(&[("token_tenants", "tokens.wasm")]);
    let mut s = Server::start_with(plugin_options(backend, &dir, &tenants_entry())).await;
    s.environment(12, 1, json!({})).await;
    let hpi = codeocean("hpi-token");
    let tum = codeocean("tum-token");
    let runner = claim_with_a_file(&s, &hpi).await;
    claim_recorded(&s, &runner, Some("hpi")).await;

    s.kill_and_restart().await;
    s.wait_idle(12, 1).await;
    // Another tenant of the environment, and the operator, who may use every environment, are
    // refused as before the restart.
    assert_refused(&s, &tum, &runner, "tum").await;
    assert_refused(&s, &s.http, &runner, "the operator").await;
    assert_usable(&s, &hpi, "hpi-token", &runner).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn a_runner_claimed_without_an_owner_is_left_to_the_tenants_of_its_environment(
    backend: Backend,
) {
    // Without an authenticator a claim names no owner, as every claim a version that recorded
    // no owners left behind.
    let dir = plugin_dir(&[("token_tenants", "tokens.wasm")]);
    let mut options = plugin_options(backend, &dir, "");
    options.extra_yaml = String::new();
    let mut s = Server::start_with(options).await;
    s.environment(12, 1, json!({})).await;
    let runner = claim_with_a_file(&s, &s.http).await;
    claim_recorded(&s, &runner, None).await;

    s.kill();
    let mut yaml = std::fs::read_to_string(s.config_path()).unwrap();
    yaml.push_str(&plugins_yaml(&dir, &tenants_entry()));
    std::fs::write(s.config_path(), yaml).unwrap();
    s.start_again();
    s.wait_idle(12, 1).await;
    // The authenticator is in place: a tenant that may not use the environment is refused.
    let (status, _) = status_and_json(
        codeocean("guess")
            .get(s.url("/execution-environments"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401);
    assert_refused(&s, &codeocean("uni-token"), &runner, "uni").await;
    assert_usable(&s, &codeocean("hpi-token"), "hpi-token", &runner).await;
    let _ = std::fs::remove_dir_all(&dir);
}
