//! The API contract to the letter: inputs the OpenAPI contract does not allow are refused with
//! 400 and a message, and the server publishes its OpenAPI document.

mod support;

use serde_json::{json, Value};
use support::{status_and_json, Server};

async fn send(s: &Server, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
    let r = s
        .http
        .request(method, s.url(path))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    status_and_json(r).await
}

fn assert_400(what: &str, (status, body): (u16, Value)) {
    assert_eq!(status, 400, "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message: {body}"
    );
}

const ENV: &str = r#"{"id": 41, "image": "host", "prewarmingPoolSize": 1, "cpuLimit": 100,
    "memoryLimit": 0, "networkAccess": false"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nulls_missing_required_arrays_and_non_objects_are_400() {
    use reqwest::Method;
    let s = Server::start().await;
    let put = "/execution-environments/41";
    assert_400(
        "exposedPorts missing",
        send(&s, Method::PUT, put, &format!("{ENV}}}")).await,
    );
    assert_400(
        "exposedPorts null",
        send(
            &s,
            Method::PUT,
            put,
            &format!("{ENV}, \"exposedPorts\": null}}"),
        )
        .await,
    );
    assert_400(
        "environment body as an array",
        send(&s, Method::PUT, put, "[41, \"host\", 1, 100, 0, false, []]").await,
    );
    let (status, body) = send(
        &s,
        Method::PUT,
        put,
        &format!("{ENV}, \"exposedPorts\": []}}"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    s.wait_idle(41, 1).await;

    let runner = s.claim(41, 0).await;
    let files = format!("/runners/{runner}/files");
    assert_400(
        "copy null",
        send(&s, Method::PATCH, &files, r#"{"copy": null}"#).await,
    );
    assert_400(
        "delete null",
        send(&s, Method::PATCH, &files, r#"{"delete": null}"#).await,
    );
    assert_400(
        "PATCH body an array",
        send(&s, Method::PATCH, &files, r#"[["a"], []]"#).await,
    );
    assert_400(
        "PATCH body a string",
        send(&s, Method::PATCH, &files, r#""x""#).await,
    );
    let (status, body) = send(&s, Method::PATCH, &files, r#"{"copy": [], "delete": []}"#).await;
    assert_eq!(status, 204, "{body}");
    let (status, body) = send(&s, Method::PATCH, &files, r#"{}"#).await;
    assert_eq!(status, 204, "{body}");

    let execute = format!("/runners/{runner}/execute");
    assert_400(
        "environment null",
        send(
            &s,
            Method::POST,
            &execute,
            r#"{"command": "true", "environment": null}"#,
        )
        .await,
    );
    assert_400(
        "execute body an array",
        send(&s, Method::POST, &execute, r#"["true"]"#).await,
    );
    let (status, body) = send(&s, Method::POST, &execute, r#"{"command": "true"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_400(
        "claim body an array",
        send(&s, Method::POST, "/runners", "[41]").await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_needs_a_boolean_value() {
    let s = Server::start().await;
    s.environment(42, 0, json!({})).await;
    for path in ["/execution-environments", "/execution-environments/42"] {
        for query in ["?fetch=", "?fetch", "?fetch=yes"] {
            let r = s
                .http
                .get(s.url(&format!("{path}{query}")))
                .send()
                .await
                .unwrap();
            assert_400(&format!("{path}{query}"), status_and_json(r).await);
        }
        let r = s
            .http
            .get(s.url(&format!("{path}?fetch=false")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}?fetch=false");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_lists_every_route_the_server_serves() {
    let s = Server::start().await;
    // Open like /health: tools read it before they have a token.
    let r = reqwest::get(s.url("/openapi.yaml")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("yaml"));
    let text = r.text().await.unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("the document is YAML");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_mapping().expect("paths");
    // Every documented path exists (a request to it is not 404 for want of a route) ...
    for (path, item) in paths {
        let path = path.as_str().unwrap();
        let concrete = path
            .replace("{executionEnvironmentId}", "42")
            .replace("{runnerId}", "no-such-runner");
        for (method, _) in item.as_mapping().unwrap() {
            let Some(method) = method.as_str().filter(|m| *m != "parameters") else {
                continue;
            };
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = s.http.request(m, s.url(&concrete)).send().await.unwrap();
            assert_ne!(
                r.status(),
                405,
                "{method} {path} is documented but not routed"
            );
            if !concrete.contains("no-such-runner") && !concrete.contains("/42") {
                assert_ne!(
                    r.status(),
                    404,
                    "{method} {path} is documented but not routed"
                );
            }
        }
    }
    // ... and every route of the contract is documented.
    for path in [
        "/health",
        "/version",
        "/statistics/execution-environments",
        "/execution-environments",
        "/execution-environments/{executionEnvironmentId}",
        "/runners",
        "/runners/{runnerId}",
        "/runners/{runnerId}/files",
        "/runners/{runnerId}/files/raw",
        "/runners/{runnerId}/execute",
        "/runners/{runnerId}/websocket",
        "/plugins",
        "/openapi.yaml",
    ] {
        assert!(paths.contains_key(path), "{path} is not documented");
    }
}
