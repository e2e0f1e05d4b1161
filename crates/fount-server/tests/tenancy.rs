use std::sync::Arc;

use axum::http::{Method, StatusCode};
use fount_server::AppState;
use fount_store::testing::stores;
use fount_store::{Price, Quota, Scope, Store, Subject};
use serde_json::json;

use crate::util::{adapter_dir, call, call_as, no_eos, state, until_idle};

/// A server with tenancy on over `store`, joined to the replicas on it: on PostgreSQL its
/// quotas are the store's shared ones, so every quota test here runs on both paths.
async fn tenant_state(store: &Store) -> Arc<AppState> {
    let s = state();
    s.enable_tenancy(store.clone());
    let joined = s.enable_replicas("127.0.0.1:0").await.unwrap();
    assert_eq!(
        joined.is_some(),
        store.backend() == fount_store::Backend::Postgres
    );
    s
}

async fn tenant_key(store: &Store, name: &str, scopes: &[Scope]) -> (String, String) {
    let t = store.create_tenant(name).await.unwrap();
    let (key, _) = store.create_key(&t.id, "test", scopes, None).await.unwrap();
    (t.id, key.expose().to_string())
}

fn ask(model: &str) -> String {
    json!({"model": model, "prompt": "hello there", "max_tokens": 4, "temperature": 0}).to_string()
}

#[tokio::test]
async fn every_v1_request_needs_a_valid_key() {
    let mut backends = Vec::new();
    // on SQLite and on PostgreSQL
    for (store, _dir) in stores("every_v1_request_nee").await {
        backends.push(store.backend());
        let s = tenant_state(&store).await;
        let (tid, key) = tenant_key(&store, "acme", &[Scope::Inference]).await;
        let r = call(&s, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
        assert_eq!(r.error().2.as_deref(), Some("invalid_api_key"));
        let r = call_as(&s, "fk-00000000-nope", Method::GET, "/v1/models", "").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let r = call_as(&s, &key, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        // health, metrics and the document stay open
        assert_eq!(
            call(&s, Method::GET, "/health", "").await.status,
            StatusCode::OK
        );
        assert_eq!(
            call(&s, Method::GET, "/metrics", "").await.status,
            StatusCode::OK
        );
        // revoked: refused at once
        let prefix = &key[..11];
        assert!(store.revoke_key(prefix).await.unwrap());
        let r = call_as(&s, &key, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        // expired, and a key without the inference scope
        let (old, _) = store
            .create_key(&tid, "old", &[Scope::Inference], Some(1))
            .await
            .unwrap();
        let r = call_as(&s, old.expose(), Method::GET, "/v1/models", "").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let (files, _) = store
            .create_key(&tid, "files", &[Scope::Files], None)
            .await
            .unwrap();
        let r = call_as(&s, files.expose(), Method::GET, "/v1/models", "").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
        // the key is in no response
        assert!(!r.body.contains(&files.expose()[12..]));
    }
    assert_eq!(
        backends,
        [fount_store::Backend::Sqlite, fount_store::Backend::Postgres]
    );
}
#[tokio::test]
async fn tenants_see_only_their_own_adapters_usage_and_cache() {
    // on SQLite and on PostgreSQL
    for (store, _dir) in stores("tenants_see_only_the").await {
        let s = tenant_state(&store).await;
        let (_, a) = tenant_key(&store, "alpha", &[Scope::Inference]).await;
        let (_, b) = tenant_key(&store, "beta", &[Scope::Inference]).await;
        let dir = adapter_dir("alpha-private", 3);
        let r = call_as(
            &s,
            &a,
            Method::POST,
            "/v1/adapters",
            &json!({"name": "mine", "path": dir}).to_string(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.json()["id"], "mine");
        let ids = |r: &crate::util::Reply| -> Vec<String> {
            r.json()["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            ids(&call_as(&s, &a, Method::GET, "/v1/models", "").await),
            ["tiny", "mine"]
        );
        assert_eq!(
            ids(&call_as(&s, &b, Method::GET, "/v1/models", "").await),
            ["tiny"]
        );
        assert_eq!(
            call_as(&s, &a, Method::POST, "/v1/completions", &ask("mine"))
                .await
                .status,
            StatusCode::OK
        );
        // beta cannot call, see or delete it: 404, as for a model that does not exist
        for (method, path, body) in [
            (Method::POST, "/v1/completions", ask("mine")),
            (Method::GET, "/v1/models/mine", String::new()),
            (Method::DELETE, "/v1/adapters/mine", String::new()),
        ] {
            let r = call_as(&s, &b, method, path, &body).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.body);
        }
        // beta may register its own "mine"
        let dir_b = adapter_dir("beta-private", 4);
        let r = call_as(
            &s,
            &b,
            Method::POST,
            "/v1/adapters",
            &json!({"name": "mine", "path": dir_b}).to_string(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        // the same long prompt: cached within a tenant, never across
        let long =
        json!({"model": "tiny", "prompt": "a shared system prompt ".repeat(10), "max_tokens": 2})
            .to_string();
        let cached = |r: crate::util::Reply| {
            r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(
            cached(call_as(&s, &a, Method::POST, "/v1/completions", &long).await),
            0
        );
        assert!(cached(call_as(&s, &a, Method::POST, "/v1/completions", &long).await) > 0);
        assert_eq!(
            cached(call_as(&s, &b, Method::POST, "/v1/completions", &long).await),
            0,
            "another tenant's prefix"
        );
        // usage: each sees its own
        let ua = call_as(&s, &a, Method::GET, "/v1/usage", "").await.json();
        let ub = call_as(&s, &b, Method::GET, "/v1/usage", "").await.json();
        let total = |u: &serde_json::Value| -> i64 {
            u["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["requests"].as_i64().unwrap())
                .sum()
        };
        // beta's refused call of "mine" is its own (recorded, billed nothing)
        assert_eq!((total(&ua), total(&ub)), (3, 2), "{ua} {ub}");
    }
}
#[tokio::test]
async fn quotas_refuse_with_openai_codes() {
    // on SQLite and on PostgreSQL
    for (store, _dir) in stores("quotas_refuse_with_o").await {
        let s = tenant_state(&store).await;
        let (tid, key) = tenant_key(&store, "small", &[Scope::Inference]).await;
        store
            .set_quota(
                Subject::Tenant(&tid),
                &Quota {
                    requests_per_minute: Some(2),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        for _ in 0..2 {
            assert_eq!(
                call_as(&s, &key, Method::POST, "/v1/completions", &ask("tiny"))
                    .await
                    .status,
                StatusCode::OK
            );
        }
        let r = call_as(&s, &key, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
        assert_eq!(r.error().2.as_deref(), Some("rate_limit_exceeded"));
        let secs: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&secs));
        // a budget: 30 tokens a day; each request reserves prompt + max_tokens
        let (tid, key) = tenant_key(&store, "budget", &[Scope::Inference]).await;
        store
            .set_quota(
                Subject::Tenant(&tid),
                &Quota {
                    tokens_per_day: Some(30),
                    models: Some(vec!["tiny".into()]),
                    max_context: Some(64),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(
            call_as(&s, &key, Method::POST, "/v1/completions", &ask("tiny"))
                .await
                .status,
            StatusCode::OK
        );
        let mut refused = None;
        for _ in 0..10 {
            let r = call_as(&s, &key, Method::POST, "/v1/completions", &ask("tiny")).await;
            if r.status != StatusCode::OK {
                refused = Some(r);
                break;
            }
        }
        let r = refused.expect("the budget runs out");
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            r.error(),
            (
                "insufficient_quota".into(),
                None,
                Some("insufficient_quota".into())
            )
        );
        // a model outside the allowed list does not exist for this tenant; nor a long request
        let dir = adapter_dir("public", 5);
        s.register_adapter("public", dir);
        let r = call_as(&s, &key, Method::POST, "/v1/completions", &ask("public")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let long = json!({"model": "tiny", "prompt": "hi", "max_tokens": 100}).to_string();
        let r = call_as(&s, &key, Method::POST, "/v1/completions", &long).await;
        assert_eq!(
            r.error().2.as_deref(),
            Some("context_length_exceeded"),
            "{}",
            r.body
        );
        // the writer's bound: with records waiting past it, new requests are refused
        let t = s.tenancy().unwrap();
        t.flush().await;
        assert_eq!(t.backlog(), 0, "every record committed");
        t.set_backlog_limit(0);
        let r = call_as(&s, &key, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
        assert_eq!(r.error().2.as_deref(), Some("queue_full"));
        assert!(r.headers.contains_key("retry-after"));
        t.set_backlog_limit(fount_server::tenancy::BACKLOG_LIMIT);
    }
}
#[tokio::test]
async fn every_request_is_recorded_exactly_once_with_the_engines_counts() {
    use rand::{Rng, SeedableRng};
    // on SQLite and on PostgreSQL
    for (store, _dir) in stores("every_request_is_rec").await {
        let s = tenant_state(&store).await;
        let mut keys = Vec::new();
        for name in ["t0", "t1", "t2"] {
            keys.push(tenant_key(&store, name, &[Scope::Inference]).await);
        }
        // t2 is rate-limited: some of its requests are refused (and recorded, billed nothing)
        store
            .set_quota(
                Subject::Tenant(&keys[2].0),
                &Quota {
                    requests_per_minute: Some(5),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // the long run: FOUNT_BILLING_REQUESTS=100000 (docs/benchmarks.md, "Exact billing")
        let requests: usize = std::env::var("FOUNT_BILLING_REQUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        // (tenant, completion tokens the client saw, whether it hung up)
        let mut seen: Vec<(usize, u64, bool, StatusCode)> = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..requests {
            let t = rng.random_range(0..3);
            let key = keys[t].1.clone();
            let stream = rng.random_bool(0.5);
            let hang_up = stream && rng.random_bool(0.3);
            let n = rng.random_range(1..3);
            let mut body = json!({"model": "tiny", "prompt": format!("request {i}"), "n": n,
            "max_tokens": rng.random_range(1..24), "temperature": 1.0, "seed": i,
            "stream": stream, "logit_bias": if hang_up { no_eos() } else { json!({}) }});
            if stream {
                body["stream_options"] = json!({"include_usage": true});
                if hang_up {
                    body["max_tokens"] = json!(1000);
                }
            }
            // a stop string could end an abandoned stream before the client hangs up
            if rng.random_bool(0.2) && !hang_up {
                body["stop"] = json!(["e"]);
            }
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                use axum::body::Body;
                use http_body_util::BodyExt;
                use tower::ServiceExt;
                let req = axum::http::Request::post("/v1/completions")
                    .header("authorization", format!("Bearer {key}"))
                    .body(Body::from(body.to_string()))
                    .unwrap();
                let res = fount_server::app(s).oneshot(req).await.unwrap();
                let status = res.status();
                let mut body = res.into_body();
                if hang_up {
                    for _ in 0..3 {
                        let _ = body.frame().await;
                    }
                    return (t, 0, true, status);
                }
                let bytes = body.collect().await.unwrap().to_bytes();
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let usage = if stream {
                    text.split("\n\n")
                        .filter_map(|e| e.strip_prefix("data: "))
                        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                        .filter_map(|v| v["usage"]["completion_tokens"].as_u64())
                        .last()
                        .unwrap_or(0)
                } else {
                    serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v["usage"]["completion_tokens"].as_u64())
                        .unwrap_or(0)
                };
                (t, usage, false, status)
            }));
            // at most 64 at a time: a long run stays within the engine's queue
            if tasks.len() == 64 || i + 1 == requests {
                for t in tasks.drain(..) {
                    seen.push(t.await.unwrap());
                }
            }
        }
        until_idle(&s).await;
        // abandoned requests are recorded once the engine lets go; wait for every record
        let mut records = Vec::new();
        for _ in 0..200 {
            records = store.usage(None, 0, i64::MAX).await.unwrap();
            if records.len() >= requests {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(records.len(), requests, "one record per request");
        for (t, (tenant, _)) in keys.iter().enumerate() {
            let mine: Vec<_> = records.iter().filter(|r| &r.tenant_id == tenant).collect();
            let sent: Vec<_> = seen.iter().filter(|x| x.0 == t).collect();
            assert_eq!(mine.len(), sent.len(), "tenant {t}");
            // completed requests: billed exactly what the responses reported
            let billed: i64 = mine
                .iter()
                .filter(|r| r.status == 200)
                .map(|r| r.completion_tokens)
                .sum();
            let reported: u64 = sent
                .iter()
                .filter(|x| !x.2 && x.3 == StatusCode::OK)
                .map(|x| x.1)
                .sum();
            assert_eq!(billed as u64, reported, "tenant {t}");
            // refused ones are billed nothing; abandoned ones what was generated
            assert!(mine
                .iter()
                .filter(|r| r.status == 429)
                .all(|r| r.completion_tokens == 0 && r.prompt_tokens == 0));
            let abandoned = mine.iter().filter(|r| r.status == 499).count();
            let hung_up = sent.iter().filter(|x| x.2 && x.3 == StatusCode::OK).count();
            assert_eq!(abandoned, hung_up, "tenant {t}");
            assert!(mine
                .iter()
                .filter(|r| r.status == 499)
                .all(|r| r.completion_tokens >= 1 && r.completion_tokens < 2000));
        }
        assert!(
            records.iter().any(|r| r.status == 429),
            "t2's limit refused some"
        );
        // the Prometheus counters hold the same totals as the records
        let metrics = call(&s, Method::GET, "/metrics", "").await.body;
        let counter = |name: &str| -> i64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(-1)
        };
        let sum = |f: fn(&fount_store::UsageRecord) -> i64| records.iter().map(f).sum::<i64>();
        assert_eq!(
            counter("fount_billed_completion_tokens_total"),
            sum(|r| r.completion_tokens)
        );
        assert_eq!(
            counter("fount_billed_prompt_tokens_total"),
            sum(|r| r.prompt_tokens)
        );
        assert_eq!(
            counter("fount_billed_cached_tokens_total"),
            sum(|r| r.cached_tokens)
        );
    }
}

#[tokio::test]
async fn the_admin_api_manages_tenants_keys_and_quotas() {
    // on SQLite and on PostgreSQL
    for (store, _dir) in stores("admin_api").await {
        let s = tenant_state(&store).await;
        let (_, admin) = tenant_key(&store, "ops", &[Scope::Admin]).await;
        let (_, user) = tenant_key(&store, "user", &[Scope::Inference]).await;
        let post = |key: &str, path: &str, body: serde_json::Value| {
            let (s, key, path) = (s.clone(), key.to_string(), path.to_string());
            async move { call_as(&s, &key, Method::POST, &path, &body.to_string()).await }
        };
        // an inference key is not an admin key
        let r = post(&user, "/admin/v1/tenants", json!({"name": "x"})).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
        let r = post(&admin, "/admin/v1/tenants", json!({"name": "acme"})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let r = post(&admin, "/admin/v1/tenants", json!({"name": "acme"})).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_REQUEST,
            "a duplicate name: {}",
            r.body
        );
        let r = post(
            &admin,
            "/admin/v1/keys",
            json!({"tenant": "acme", "scopes": ["inference"]}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let created = r.json();
        let secret = created["key"].as_str().unwrap().to_string();
        let prefix = created["info"]["prefix"].as_str().unwrap().to_string();
        assert!(secret.starts_with(&prefix));
        // the new key works; listings show its prefix, never the secret
        assert_eq!(
            call_as(&s, &secret, Method::POST, "/v1/completions", &ask("tiny"))
                .await
                .status,
            StatusCode::OK
        );
        let list = call_as(&s, &admin, Method::GET, "/admin/v1/keys?tenant=acme", "").await;
        assert!(
            list.body.contains(&prefix) && !list.body.contains(&secret[12..]),
            "{}",
            list.body
        );
        let r = post(&admin, "/admin/v1/keys", json!({"tenant": "nobody"})).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = post(
            &admin,
            "/admin/v1/keys",
            json!({"tenant": "acme", "scopes": ["root"]}),
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        // a quota, then revocation
        let r = call_as(
            &s,
            &admin,
            Method::PUT,
            "/admin/v1/quotas/acme",
            &json!({"requests_per_minute": 1}).to_string(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // the quota cache
        let r = call_as(&s, &secret, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(
            r.status,
            StatusCode::TOO_MANY_REQUESTS,
            "one request a minute: {}",
            r.body
        );
        let r = call_as(
            &s,
            &admin,
            Method::DELETE,
            &format!("/admin/v1/keys/{prefix}"),
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let r = call_as(&s, &secret, Method::GET, "/v1/models", "").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        let tenants = call_as(&s, &admin, Method::GET, "/admin/v1/tenants", "")
            .await
            .json();
        let names: Vec<&str> = tenants["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["acme", "ops", "user"]);

        // a key's own quota, prices, and usage export
        let (_, k2) = tenant_key(&store, "keyed", &[Scope::Inference]).await;
        let info = store.keys(None).await.unwrap();
        let k2_prefix = &info
            .iter()
            .find(|k| k2.starts_with(&k.prefix))
            .unwrap()
            .prefix;
        let put = |key: &str, path: &str, body: serde_json::Value| {
            let (s, key, path) = (s.clone(), key.to_string(), path.to_string());
            async move { call_as(&s, &key, Method::PUT, &path, &body.to_string()).await }
        };
        let path = format!("/admin/v1/keys/{k2_prefix}/quota");
        let r = put(&admin, &path, json!({"weight": 2})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "keys carry no weight");
        let r = put(&admin, &path, json!({"max_context": 7})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let r = put(&admin, "/admin/v1/keys/fk-nothere/quota", json!({})).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = call_as(&s, &k2, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(r.error().2.as_deref(), Some("context_length_exceeded"));
        let r = put(&admin, "/admin/v1/quotas/ops", json!({"weight": 0})).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);

        let r = put(
            &admin,
            "/admin/v1/prices/tiny",
            json!({"input": "0.5", "output": "2", "training": "3"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let r = put(
            &admin,
            "/admin/v1/prices/tiny",
            json!({"input": "-1", "output": "2"}),
        )
        .await;
        assert_eq!(r.error().1.as_deref(), Some("input"), "{}", r.body);
        let r = put(
            &user,
            "/admin/v1/prices/tiny",
            json!({"input": "0", "output": "0"}),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let prices = call_as(&s, &admin, Method::GET, "/admin/v1/prices", "")
            .await
            .json();
        assert_eq!(
            prices["data"],
            json!([{"model": "tiny", "input": "0.500000", "cached_input": "0.500000", "output": "2.000000", "training": "3.000000"}])
        );
        let r = call_as(
            &s,
            &admin,
            Method::GET,
            "/admin/v1/usage?tenant=acme&from=2020-01-01",
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let statuses: Vec<i64> = r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["status"].as_i64().unwrap())
            .collect();
        assert_eq!(statuses, [200, 429], "the refused request is recorded too");
        let r = call_as(
            &s,
            &admin,
            Method::GET,
            "/admin/v1/usage?from=yesterday",
            "",
        )
        .await;
        assert_eq!(r.error().1.as_deref(), Some("from"), "{}", r.body);
    }
}

#[tokio::test]
async fn a_keys_quota_applies_on_top_of_its_tenants() {
    // on SQLite and on PostgreSQL
    for (store, _dir) in stores("key_quota").await {
        let s = tenant_state(&store).await;
        let (tid, narrow) = tenant_key(&store, "team", &[Scope::Inference]).await;
        let (wide, wide_info) = store
            .create_key(&tid, "wide", &[Scope::Inference], None)
            .await
            .unwrap();
        let wide = wide.expose().to_string();
        let narrow_id = store
            .keys(Some(&tid))
            .await
            .unwrap()
            .into_iter()
            .find(|k| k.id != wide_info.id)
            .unwrap()
            .id;
        // the narrow key: one request a minute, and only the base model
        store
            .set_quota(
                Subject::Key(&narrow_id),
                &Quota {
                    requests_per_minute: Some(1),
                    models: Some(vec!["tiny".into()]),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        s.register_adapter("public", adapter_dir("public", 5));
        let ok = call_as(&s, &narrow, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
        let r = call_as(&s, &narrow, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(r.error().2.as_deref() == Some("rate_limit_exceeded"));
        assert!(r.body.contains("key's"), "{}", r.body);
        let models = call_as(&s, &narrow, Method::GET, "/v1/models", "")
            .await
            .json();
        assert_eq!(models["data"].as_array().unwrap().len(), 1, "{models}");
        let r = call_as(&s, &narrow, Method::GET, "/v1/models/public", "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        // the tenant's other key is untouched
        for _ in 0..3 {
            let r = call_as(&s, &wide, Method::POST, "/v1/completions", &ask("public")).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        }
        // the tenant's limit binds every key
        store
            .set_quota(
                Subject::Tenant(&tid),
                &Quota {
                    concurrent_requests: Some(0),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await; // the quota cache
        let r = call_as(&s, &wide, Method::POST, "/v1/completions", &ask("tiny")).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(r.body.contains("tenant's"), "{}", r.body);
    }
}

#[tokio::test]
async fn records_carry_their_cost_at_the_models_price() {
    // on SQLite and on PostgreSQL
    for (store, _dir) in stores("prices").await {
        let s = tenant_state(&store).await;
        let (tid, key) = tenant_key(&store, "payer", &[Scope::Inference]).await;
        let base = Price {
            input: 500_000,
            cached_input: 250_000,
            output: 2_000_000,
            training: 0,
        };
        store.set_price("tiny", &base).await.unwrap();
        let own = Price {
            input: 1_000_000,
            cached_input: 1_000_000,
            output: 3_000_000,
            training: 0,
        };
        store.set_price("priced", &own).await.unwrap();
        s.register_adapter("priced", adapter_dir("priced", 6));
        s.register_adapter("unpriced", adapter_dir("unpriced", 7));
        let prompt =
            "the same long prompt, sent twice so that its prefix is cached the second time";
        for model in ["tiny", "tiny", "priced", "unpriced"] {
            let body = json!({"model": model, "prompt": prompt, "max_tokens": 5, "temperature": 0});
            let r = call_as(&s, &key, Method::POST, "/v1/completions", &body.to_string()).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        }
        s.tenancy().unwrap().flush().await;
        let records = store.usage(Some(&tid), 0, i64::MAX).await.unwrap();
        assert_eq!(records.len(), 4);
        assert!(
            records.iter().any(|r| r.cached_tokens > 0),
            "a cached prefix"
        );
        for r in &records {
            // an adapter without a price of its own costs what its base model does
            let p = if r.model == "priced" { own } else { base };
            assert_eq!(
                r.cost_picodollars,
                p.cost(r.prompt_tokens, r.cached_tokens, r.completion_tokens),
                "{r:?}"
            );
            assert!(r.cost_picodollars > 0);
        }
        let usage = call_as(&s, &key, Method::GET, "/v1/usage", "").await.json();
        let total: i64 = records.iter().map(|r| r.cost_picodollars).sum();
        let shown: Vec<&str> = usage["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["cost_usd"].as_str().unwrap())
            .collect();
        assert_eq!(shown.len(), 3, "{usage}");
        let shown_total: f64 = shown.iter().map(|c| c.parse::<f64>().unwrap()).sum();
        assert!((shown_total - total as f64 * 1e-12).abs() < 3e-6, "{usage}");
    }
}
