use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use fount_server::AppState;
use fount_store::testing::stores;
use fount_store::{Scope, Store};
use serde_json::json;

use crate::util::{adapter_dir, call_as, state};

/// A replica over `store` keeping artifacts in `artifacts`, its cache in `cache`.
async fn replica(
    store: &Store,
    artifacts: &std::path::Path,
    cache: &std::path::Path,
) -> Arc<AppState> {
    let s = state();
    s.enable_tenancy(store.clone());
    s.enable_artifacts(
        fount_artifacts::Artifacts::open(artifacts.to_str().unwrap(), cache).unwrap(),
    );
    s.enable_replicas("127.0.0.1:0").await.unwrap();
    s
}

fn ask(model: &str) -> String {
    json!({"model": model, "prompt": "hello", "max_tokens": 2}).to_string()
}

async fn until(what: &str, limit: Duration, mut ok: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn an_adapter_registered_on_one_replica_is_fetched_and_checked_by_another() {
    for (store, _dir) in stores("replicas_registry").await {
        let b = store.backend();
        let tmp = tempfile::tempdir().unwrap();
        let objects = tmp.path().join("objects");
        let a = replica(&store, &objects, &tmp.path().join("cache-a")).await;
        let other = replica(&store, &objects, &tmp.path().join("cache-b")).await;
        let t = store.create_tenant("ops").await.unwrap();
        let (key, _) = store
            .create_key(&t.id, "ops", &[Scope::Admin, Scope::Inference], None)
            .await
            .unwrap();
        let key = key.expose().to_string();
        let dir = adapter_dir("shared", 3);
        let body = json!({"name": "shared", "path": dir.display().to_string()}).to_string();
        let r = call_as(&a, &key, Method::POST, "/v1/adapters", &body).await;
        assert_eq!(r.status, StatusCode::OK, "{b:?}: {}", r.body);
        // the other replica learns of it within a second and fetches it on first use
        let took = until("the other replica", Duration::from_secs(1), async || {
            call_as(
                &other,
                &key,
                Method::POST,
                "/v1/completions",
                &ask("shared"),
            )
            .await
            .status
                == StatusCode::OK
        })
        .await;
        assert!(took < Duration::from_secs(1), "{b:?}: {took:?}");
        let cached: Vec<_> = std::fs::read_dir(tmp.path().join("cache-b"))
            .unwrap()
            .filter_map(Result::ok)
            .collect();
        assert_eq!(
            cached.len(),
            1,
            "{b:?}: one adapter in the cache, named by its digest"
        );

        // a stored file changed behind the store's back: a fresh replica refuses to serve it
        let stored = walk(&objects)
            .into_iter()
            .find(|p| p.ends_with("adapter_model.safetensors"))
            .unwrap();
        std::fs::write(&stored, b"not the adapter").unwrap();
        let third = replica(&store, &objects, &tmp.path().join("cache-c")).await;
        let r = call_as(
            &third,
            &key,
            Method::POST,
            "/v1/completions",
            &ask("shared"),
        )
        .await;
        // (the log names the file and both digests; the client is told only of a server error)
        assert_eq!(
            r.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{b:?}: {}",
            r.body
        );
        assert_eq!(
            std::fs::read_dir(tmp.path().join("cache-c")).map_or(0, |d| d.count()),
            0,
            "{b:?}: nothing half-fetched is kept"
        );
        // the replica that has it cached still serves it
        let r = call_as(
            &other,
            &key,
            Method::POST,
            "/v1/completions",
            &ask("shared"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{b:?}: {}", r.body);

        // an `artifacts:` path that is not there, and one on a server without a store
        let body = json!({"name": "ghost", "path": "artifacts:adapters/none"}).to_string();
        let r = call_as(&a, &key, Method::POST, "/v1/adapters", &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{b:?}: {}", r.body);
        assert!(r.body.contains("not found"), "{}", r.body);
        let plain = state();
        plain.enable_tenancy(store.clone());
        let r = call_as(&plain, &key, Method::POST, "/v1/adapters", &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{b:?}: {}", r.body);
        assert!(r.body.contains("--artifacts"), "{}", r.body);

        // removed on one replica: gone on the other within a second
        let r = call_as(&other, &key, Method::DELETE, "/v1/adapters/shared", "").await;
        assert_eq!(r.status, StatusCode::OK, "{b:?}: {}", r.body);
        until("the removal", Duration::from_secs(1), async || {
            call_as(&a, &key, Method::POST, "/v1/completions", &ask("shared"))
                .await
                .status
                == StatusCode::NOT_FOUND
        })
        .await;
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
