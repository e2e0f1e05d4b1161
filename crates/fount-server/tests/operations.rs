use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::util::{adapter_dir, call, mask, post, state};

#[tokio::test]
async fn adapters_are_registered_listed_used_and_removed() {
    let s = state();
    let r = call(&s, Method::GET, "/v1/models", "").await;
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 1);
    assert_eq!(r.json()["data"][0]["id"], "tiny");
    let dir = adapter_dir("support", 1);
    let r = post(&s, "/v1/adapters", json!({"name": "support", "path": dir})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["parent"], "tiny");
    let models = call(&s, Method::GET, "/v1/models", "").await.json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "support"]);
    insta::assert_snapshot!(
        "models",
        mask(&call(&s, Method::GET, "/v1/models/support", "").await.body)
            .replace(&*s.context().to_string(), "[ctx]")
    );
    // the adapter changes the answer
    let ask = |model: &str| json!({"model": model, "prompt": "hello world", "max_tokens": 6, "temperature": 0});
    let base = post(&s, "/v1/completions", ask("tiny")).await.json();
    let tuned = post(&s, "/v1/completions", ask("support")).await.json();
    assert_ne!(base["choices"][0]["text"], tuned["choices"][0]["text"]);
    assert_eq!(tuned["model"], "support");
    // bad registrations
    for (body, param) in [
        (json!({"name": "bad name", "path": dir}), "name"),
        (json!({"name": "tiny", "path": dir}), "name"),
        (json!({"name": "x", "path": "/nonexistent/adapter"}), "path"),
        (
            json!({"name": "x", "path": crate::util::model_dir()}),
            "path",
        ),
    ] {
        let r = post(&s, "/v1/adapters", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert_eq!(r.error().1.as_deref(), Some(param), "{}", r.body);
    }
    // removal
    let r = call(&s, Method::DELETE, "/v1/adapters/support", "").await;
    assert_eq!(
        r.json(),
        json!({"id": "support", "object": "model", "deleted": true})
    );
    let r = post(&s, "/v1/completions", ask("support")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let s = state();
    post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hi", "max_tokens": 3}),
    )
    .await;
    post(
        &s,
        "/v1/completions",
        json!({"model": "nope", "prompt": "hi"}),
    )
    .await;
    // the engine accounts a step just after sending its events: wait for it
    let mut r = call(&s, Method::GET, "/metrics", "").await;
    for _ in 0..100 {
        if r.body.contains("fount_generated_tokens_total 3") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        r = call(&s, Method::GET, "/metrics", "").await;
    }
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for needle in [
        "fount_http_requests_total{route=\"/v1/completions\",method=\"POST\",status=\"200\"} 1",
        "fount_http_requests_total{route=\"/v1/completions\",method=\"POST\",status=\"404\"} 1",
        "fount_http_request_duration_seconds_bucket{",
        "fount_requests_waiting 0",
        "fount_sequences_running",
        "fount_kv_blocks_used",
        "fount_kv_blocks_free",
        "fount_prefix_cache_hit_rate",
        "fount_adapters_resident 0",
        "fount_generation_tokens_per_second",
        "fount_time_to_first_token_seconds{quantile=\"0.5\"}",
        "fount_inter_token_latency_seconds{quantile=\"0.99\"}",
        "fount_generated_tokens_total 3",
        "fount_prompt_tokens_total",
        "fount_engine_steps_total",
        "# EOF",
    ] {
        assert!(r.body.contains(needle), "missing {needle:?} in\n{}", r.body);
    }
    // a second scrape does not count the totals twice
    let again = call(&s, Method::GET, "/metrics", "").await;
    assert!(
        again.body.contains("fount_generated_tokens_total 3"),
        "{}",
        again.body
    );
}

#[tokio::test]
async fn health_is_ok() {
    let s = state();
    let r = call(&s, Method::GET, "/health", "").await;
    assert_eq!(
        (r.status, r.json()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
}

/// The committed OpenAPI document is what the code generates (`FOUNT_BLESS=1` rewrites it).
#[tokio::test]
async fn the_openapi_document_is_committed_and_served() {
    let generated = fount_server::openapi_json();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    if std::env::var_os("FOUNT_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is out of date; regenerate it with `FOUNT_BLESS=1 cargo test -p fount-server --test main openapi`"
    );
    let s = state();
    let r = call(&s, Method::GET, "/openapi.json", "").await;
    assert_eq!(r.body, generated);
    let doc = r.json();
    for route in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/v1/models/{id}",
        "/v1/adapters",
        "/v1/adapters/{id}",
        "/health",
        "/metrics",
    ] {
        assert!(
            doc["paths"].get(route).is_some(),
            "{route} is not documented"
        );
    }
}
