use std::sync::Arc;

use axum::http::{Method, StatusCode};
use fount_engine::EngineConfig;
use fount_server::ServerConfig;
use serde_json::json;

use crate::util::{call, mask, post, state, state_with};

fn chat(extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Asserts a 400 `invalid_request_error` naming `param`.
async fn refused(
    s: &Arc<fount_server::AppState>,
    path: &str,
    body: serde_json::Value,
    param: Option<&str>,
) {
    let r = post(s, path, body.clone()).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.body);
    let (kind, p, _) = r.error();
    assert_eq!(kind, "invalid_request_error", "{}", r.body);
    assert_eq!(p.as_deref(), param, "{body}: {}", r.body);
}

#[tokio::test]
async fn malformed_bodies_name_the_field() {
    let s = state();
    let path = "/v1/chat/completions";
    // not JSON at all, and JSON with trailing garbage
    for raw in ["{not json", "", "{\"model\": \"tiny\"} x"] {
        let r = call(&s, Method::POST, path, raw).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{raw:?}: {}", r.body);
        let (kind, param, _) = r.error();
        assert_eq!(kind, "invalid_request_error");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("JSON")
                || param.is_some(),
            "{}",
            r.body
        );
    }
    // wrong types and missing fields
    refused(
        &s,
        path,
        chat(json!({"temperature": "hot"})),
        Some("temperature"),
    )
    .await;
    refused(&s, path, chat(json!({"n": -1})), Some("n")).await;
    refused(
        &s,
        path,
        chat(json!({"max_tokens": 1.5})),
        Some("max_tokens"),
    )
    .await;
    refused(&s, path, json!({"model": "tiny"}), Some("messages")).await;
    refused(&s, path, json!({"messages": []}), Some("model")).await;
    refused(
        &s,
        path,
        chat(json!({"messages": [{"role": "usr", "content": "x"}]})),
        Some("messages[0].role"),
    )
    .await;
    refused(
        &s,
        path,
        chat(json!({"messages": [{"content": "x"}]})),
        Some("messages[0].role"),
    )
    .await;
    refused(&s, path, chat(json!({"stop": 7})), Some("stop")).await;
    refused(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": {"a": 1}}),
        Some("prompt"),
    )
    .await;
    // unknown fields are ignored, as OpenAI ignores them
    let r = post(
        &s,
        path,
        chat(json!({"frobnicate": true, "metadata": {"k": "v"}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn out_of_range_values_are_refused() {
    let s = state();
    let path = "/v1/chat/completions";
    for (extra, param) in [
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"n": 0}), "n"),
        (json!({"n": 17}), "n"),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"stop": [""]}), "stop"),
        (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"logit_bias": {"999999": 1}}), "logit_bias"),
        (json!({"logit_bias": {"5": 101}}), "logit_bias"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"max_completion_tokens": 0}), "max_completion_tokens"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (json!({"tools": [{"type": "function"}]}), "tools"),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format.type",
        ),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0].type",
        ),
    ] {
        refused(&s, path, chat(extra), Some(param)).await;
    }
    let c = |extra: serde_json::Value| {
        let mut b = json!({"model": "tiny", "prompt": "hello", "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (extra, param) in [
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"echo": true}), "echo"),
        (json!({"suffix": "x"}), "suffix"),
        (json!({"best_of": 0}), "best_of"),
        (json!({"best_of": 17}), "best_of"),
        (json!({"n": 2, "best_of": 1}), "best_of"),
        (json!({"best_of": 2, "stream": true}), "best_of"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [99999]}), "prompt"),
    ] {
        refused(&s, "/v1/completions", c(extra), Some(param)).await;
    }
}

#[tokio::test]
async fn unknown_models_and_routes_are_404() {
    let s = state();
    let r = post(&s, "/v1/chat/completions", chat(json!({"model": "gpt-4o"}))).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert_eq!(
        r.error(),
        (
            "invalid_request_error".into(),
            Some("model".into()),
            Some("model_not_found".into())
        )
    );
    insta::assert_snapshot!("unknown_model", mask(&r.body));
    let r = call(&s, Method::GET, "/v1/models/nope", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = call(&s, Method::GET, "/v2/everything", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error().2.as_deref(), Some("not_found"));
    let r = call(&s, Method::GET, "/v1/chat/completions", "").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{}", r.body);
    assert_eq!(r.error().2.as_deref(), Some("method_not_allowed"));
    let r = call(&s, Method::DELETE, "/v1/adapters/nope", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error().2.as_deref(), Some("adapter_not_found"));
}

#[tokio::test]
async fn prompts_longer_than_the_context_are_refused() {
    let s = state();
    let context = s.context();
    let long = "word ".repeat(context);
    let r = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"messages": [{"role": "user", "content": long}]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert_eq!(
        r.error(),
        (
            "invalid_request_error".into(),
            Some("messages".into()),
            Some("context_length_exceeded".into())
        )
    );
    // the prompt fits but the tokens asked for do not
    let r = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"max_tokens": context})),
    )
    .await;
    assert_eq!(
        r.error().2.as_deref(),
        Some("context_length_exceeded"),
        "{}",
        r.body
    );
    insta::assert_snapshot!("context_length_exceeded", mask(&r.body));
    let r = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": "hi", "max_tokens": 4_000_000_000u64}),
    )
    .await;
    assert_eq!(
        r.error(),
        (
            "invalid_request_error".into(),
            Some("prompt".into()),
            Some("context_length_exceeded".into())
        )
    );
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let s = state_with(
        EngineConfig {
            kv_bytes: 16 << 20,
            ..Default::default()
        },
        ServerConfig {
            model_name: "tiny".into(),
            max_body_bytes: 1024,
            max_model_len: None,
        },
    );
    let big = "x".repeat(4096);
    let r = post(
        &s,
        "/v1/chat/completions",
        chat(json!({"messages": [{"role": "user", "content": big}]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(r.error().2.as_deref(), Some("request_too_large"));
    // the rest of the body was never read: the connection must not be reused for another
    // request (a client that did would see it reset)
    assert_eq!(
        r.headers.get("connection").and_then(|v| v.to_str().ok()),
        Some("close")
    );
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    // one running sequence, one waiting: of many requests at once, some must be refused
    let s = state_with(
        EngineConfig {
            kv_bytes: 16 << 20,
            max_running: 1,
            max_waiting: 1,
            ..Default::default()
        },
        ServerConfig {
            model_name: "tiny".into(),
            ..Default::default()
        },
    );
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            post(&s, "/v1/completions", json!({"model": "tiny", "prompt": "hello there", "max_tokens": 64, "temperature": 0})).await
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                busy += 1;
                assert_eq!(
                    r.headers.get("retry-after").and_then(|v| v.to_str().ok()),
                    Some("1")
                );
                assert_eq!(
                    r.error(),
                    ("rate_limit_error".into(), None, Some("queue_full".into()))
                );
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(ok >= 1 && busy >= 1, "{ok} answered, {busy} refused");
    crate::util::until_idle(&s).await;
}

#[tokio::test]
async fn a_draining_server_answers_503() {
    let s = state();
    s.drain();
    let r = post(&s, "/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(r.error().2.as_deref(), Some("shutting_down"));
    let r = call(&s, Method::GET, "/health", "").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["status"], "draining");
}
