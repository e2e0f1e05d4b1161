//! A tiny model, server state over it, and a way to call the router without a socket.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use fount_engine::EngineConfig;
use fount_model::init::{init_model, preset, InitOptions};
use fount_model::Arch;
use fount_server::{app, AppState, ServerConfig};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// The tiny Qwen2 model (written once per test run).
pub fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fount-server-tiny-{}", std::process::id()));
        let opts = InitOptions {
            std: 0.2,
            ..Default::default()
        };
        init_model(
            Arch::Qwen2,
            &preset(Arch::Qwen2, "tiny").unwrap(),
            &opts,
            &d,
        )
        .unwrap();
        d
    })
}

/// A random rank-4 adapter for the tiny model, written under the test scratch directory.
pub fn adapter_dir(name: &str, seed: u64) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fount-server-adapters-{}", std::process::id()))
        .join(name);
    let cfg = fount_model::HfConfig::from_file(&model_dir().join("config.json"))
        .unwrap()
        .resolve()
        .unwrap();
    fount_model::init::init_lora(&cfg, 4, 0.3, seed, &d).unwrap();
    d
}

/// Server state over the tiny model with `engine` settings.
pub fn state_with(engine: EngineConfig, cfg: ServerConfig) -> Arc<AppState> {
    AppState::load(model_dir(), None, engine, cfg).unwrap()
}

/// Server state with the defaults (model name `tiny`).
pub fn state() -> Arc<AppState> {
    state_with(
        EngineConfig {
            kv_bytes: 64 << 20,
            ..Default::default()
        },
        ServerConfig {
            model_name: "tiny".into(),
            ..Default::default()
        },
    )
}

/// A response: status, headers, body text.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The OpenAI error object's `(type, param, code)`.
    pub fn error(&self) -> (String, Option<String>, Option<String>) {
        let j = self.json();
        let e = &j["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
        (
            e["type"].as_str().unwrap_or_default().to_string(),
            e["param"].as_str().map(str::to_string),
            e["code"].as_str().map(str::to_string),
        )
    }

    /// The `data:` payloads of a server-sent event stream.
    pub fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

/// Sends one request through the router.
pub async fn call(state: &Arc<AppState>, method: Method, path: &str, body: &str) -> Reply {
    send(state, None, method, path, body).await
}

async fn send(
    state: &Arc<AppState>,
    key: Option<&str>,
    method: Method,
    path: &str,
    body: &str,
) -> Reply {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req.body(Body::from(body.to_string())).unwrap();
    let res = app(state.clone()).oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// `POST path` with a JSON body.
pub async fn post(state: &Arc<AppState>, path: &str, body: serde_json::Value) -> Reply {
    call(state, Method::POST, path, &body.to_string()).await
}

/// Masks what changes from run to run (ids, times) in a JSON text.
pub fn mask(text: &str) -> String {
    let mut v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return text.to_string(),
    };
    if let Some(o) = v.as_object_mut() {
        for (k, val) in o.iter_mut() {
            match k.as_str() {
                "id" if val.as_str().is_some_and(|s| s.contains("cmpl")) => {
                    *val = "[id]".into();
                }
                "created" => *val = "[time]".into(),
                _ => {}
            }
        }
    }
    serde_json::to_string_pretty(&v).unwrap()
}

/// Waits (up to 5 s) until the engine holds no KV blocks for running sequences, and asserts it.
pub async fn until_idle(state: &Arc<AppState>) {
    for _ in 0..500 {
        let m = state.engine().metrics();
        if m.blocks_used == 0 && m.running == 0 && m.waiting == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "the engine still holds blocks: {:?}",
        state.engine().metrics()
    );
}

/// `logit_bias` that keeps the tiny model from ending a sequence (every end-of-sequence id at
/// −100), so a request runs to its `max_tokens`.
pub fn no_eos() -> serde_json::Value {
    let text = std::fs::read_to_string(model_dir().join("generation_config.json")).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids: Vec<u64> = match &cfg["eos_token_id"] {
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64()).collect(),
        v => v.as_u64().into_iter().collect(),
    };
    assert!(!ids.is_empty(), "no eos_token_id in {cfg}");
    serde_json::Value::Object(
        ids.iter()
            .map(|id| (id.to_string(), (-100.0).into()))
            .collect(),
    )
}

/// Sends one request with `Authorization: Bearer key`.
pub async fn call_as(
    state: &Arc<AppState>,
    key: &str,
    method: Method,
    path: &str,
    body: &str,
) -> Reply {
    send(state, Some(key), method, path, body).await
}

/// A key of `tenant` (created when new) with `scopes`.
pub async fn key(
    store: &fount_store::Store,
    tenant: &str,
    scopes: &[fount_store::Scope],
) -> String {
    let t = match store.tenant_by_name(tenant).await.unwrap() {
        Some(t) => t,
        None => store.create_tenant(tenant).await.unwrap(),
    };
    let (key, _) = store.create_key(&t.id, "test", scopes, None).await.unwrap();
    key.expose().to_string()
}
