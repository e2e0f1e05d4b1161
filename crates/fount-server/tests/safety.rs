use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use fount_server::AppState;
use fount_store::testing::stores;
use fount_store::{Scope, Store};
use serde_json::{json, Value};

use crate::util::{call, call_as, key, no_eos, state, until_idle};

/// A server with tenancy and safety on over `store`.
async fn safe_state(store: &Store) -> Arc<AppState> {
    let s = state();
    s.enable_tenancy(store.clone());
    s.enable_safety().await.unwrap();
    s
}

async fn set_policy(
    s: &Arc<AppState>,
    admin: &str,
    tenant: &str,
    policy: &str,
) -> (StatusCode, Value) {
    let r = call_as(
        s,
        admin,
        Method::PUT,
        &format!("/admin/v1/tenants/{tenant}/policy"),
        &json!({ "policy": policy }).to_string(),
    )
    .await;
    (r.status, serde_json::from_str(&r.body).unwrap_or_default())
}

fn chat(text: &str, max_tokens: u32, stream: bool) -> String {
    json!({
        "model": "tiny", "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens, "temperature": 0, "stream": stream, "logit_bias": no_eos(),
    })
    .to_string()
}

async fn chat_as(
    s: &Arc<AppState>,
    key: &str,
    text: &str,
    max: u32,
    stream: bool,
) -> crate::util::Reply {
    call_as(
        s,
        key,
        Method::POST,
        "/v1/chat/completions",
        &chat(text, max, stream),
    )
    .await
}

fn message(r: &crate::util::Reply) -> String {
    r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The text of a chat answer, streamed or not, and its finish reason.
fn answer(body: &str) -> (String, String) {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        let c = &v["choices"][0];
        return (
            c["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            c["finish_reason"].as_str().unwrap_or_default().to_string(),
        );
    }
    let (mut text, mut finish) = (String::new(), String::new());
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

#[tokio::test]
async fn moderations_flag_personal_data_and_listed_terms_in_english_and_chinese() {
    for (store, _dir) in stores("moderations").await {
        let s = safe_state(&store).await;
        let k = key(&store, "acme", &[Scope::Inference]).await;
        let body = json!({"input": [
            "Write to jane.doe@example.com about it.",
            "我的身份证号是11010519491231002X。",
            "How do I make a bomb at home?",
            "教我怎么制造炸弹",
            "The village well is open on Sundays.",
            "村里的井星期天开放。",
        ]});
        let r = call_as(&s, &k, Method::POST, "/v1/moderations", &body.to_string()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let v = r.json();
        assert!(v["id"].as_str().unwrap().starts_with("modr-"));
        assert_eq!(v["model"], "omni-moderation-latest");
        let results = v["results"].as_array().unwrap();
        let flagged: Vec<bool> = results
            .iter()
            .map(|r| r["flagged"].as_bool().unwrap())
            .collect();
        assert_eq!(flagged, [true, true, true, true, false, false]);
        assert_eq!(results[0]["categories"]["pii"], true);
        assert_eq!(results[1]["categories"]["pii"], true);
        assert_eq!(results[2]["categories"]["illicit/violent"], true);
        assert_eq!(results[2]["category_scores"]["illicit/violent"], 1.0);
        assert_eq!(results[3]["categories"]["illicit/violent"], true);
        // every OpenAI category is there
        for c in [
            "harassment",
            "hate/threatening",
            "self-harm/intent",
            "sexual/minors",
            "violence/graphic",
        ] {
            assert_eq!(results[4]["categories"][c], false, "{c}");
        }
        // one string; bad requests
        let r = call_as(
            &s,
            &k,
            Method::POST,
            "/v1/moderations",
            r#"{"input": "hello"}"#,
        )
        .await;
        assert_eq!(r.json()["results"].as_array().unwrap().len(), 1);
        let r = call_as(&s, &k, Method::POST, "/v1/moderations", r#"{"input": []}"#).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = call_as(
            &s,
            &k,
            Method::POST,
            "/v1/moderations",
            r#"{"input": "x", "model": "nope"}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
        let r = call_as(
            &s,
            &k,
            Method::POST,
            "/v1/moderations",
            r#"{"inputs": "x"}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        // no key, no moderation
        let r = call(&s, Method::POST, "/v1/moderations", r#"{"input": "x"}"#).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        // each flagged input has an audit record with the content's hash, not the content
        tokio::time::sleep(Duration::from_millis(300)).await;
        let audit = store.audit(0, i64::MAX, None).await.unwrap();
        assert_eq!(audit.iter().filter(|a| a.stage == "moderation").count(), 4);
        assert!(audit
            .iter()
            .all(|a| a.content.is_none() && a.content_sha256.len() == 64));
    }
}

#[tokio::test]
async fn an_input_policy_refuses_before_admission_and_bills_nothing() {
    for (store, _dir) in stores("input_policy").await {
        let b = store.backend();
        let s = safe_state(&store).await;
        let admin = key(&store, "ops", &[Scope::Admin]).await;
        let acme = key(&store, "acme", &[Scope::Inference]).await;
        let other = key(&store, "other", &[Scope::Inference]).await;
        let policy = "[input]\nblock = [\"illicit\", \"pii\"]\nlog = [\"violence\"]\n\n[[rules]]\ncategory = \"illicit\"\nterms = [\"counterfeit banknotes\", \"假钞\"]\n";
        let (status, v) = set_policy(&s, &admin, "acme", policy).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        for text in [
            "Where can I buy counterfeit banknotes?",
            "哪里能买到假钞",
            "mail me at a@example.com",
            "how to make a bomb",
        ] {
            let r = chat_as(&s, &acme, text, 4, false).await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{b:?} {text}: {}",
                r.body
            );
            let (_, param, code) = r.error();
            assert_eq!(
                (param.as_deref(), code.as_deref()),
                (Some("messages"), Some("content_policy_violation"))
            );
            assert!(
                message(&r).contains("illicit") || message(&r).contains("pii"),
                "{}",
                message(&r)
            );
        }
        // completions too, token-id prompts decoded for the check
        let tok =
            fount_model::Tokenizer::from_file(&crate::util::model_dir().join("tokenizer.json"))
                .unwrap();
        let ids = tok.encode("counterfeit banknotes", false).unwrap();
        let r = call_as(
            &s,
            &acme,
            Method::POST,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": ids, "max_tokens": 2}).to_string(),
        )
        .await;
        assert_eq!(
            r.error().2.as_deref(),
            Some("content_policy_violation"),
            "{}",
            r.body
        );
        // logged, served
        let r = chat_as(&s, &acme, "I will kill you", 2, false).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        // another tenant is not held to acme's policy
        let r = chat_as(&s, &other, "counterfeit banknotes", 2, false).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        until_idle(&s).await;
        s.tenancy().unwrap().flush().await;
        let usage = store.usage(None, 0, i64::MAX).await.unwrap();
        let refused: Vec<_> = usage.iter().filter(|u| u.status == 400).collect();
        assert_eq!(refused.len(), 5, "{b:?}: one record per refused request");
        assert!(refused
            .iter()
            .all(|u| u.prompt_tokens + u.completion_tokens == 0 && u.cost_picodollars == 0));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let audit = store.audit(0, i64::MAX, None).await.unwrap();
        let blocks = audit
            .iter()
            .filter(|a| a.stage == "input" && a.action == "block")
            .count();
        let logs = audit
            .iter()
            .filter(|a| a.stage == "input" && a.action == "log")
            .count();
        assert_eq!((blocks, logs), (5, 1), "{b:?}");
        assert!(audit
            .iter()
            .any(|a| a.categories.contains("\"illicit\"") && a.rules.contains("illicit#1")));
    }
}

#[tokio::test]
async fn personal_data_is_redacted_before_the_model_reads_it() {
    let (store, _dir) = stores("redact").await.remove(0);
    let s = safe_state(&store).await;
    let admin = key(&store, "ops", &[Scope::Admin]).await;
    let acme = key(&store, "acme", &[Scope::Inference]).await;
    let (status, v) = set_policy(
        &s,
        &admin,
        "acme",
        "keep_content = true\n[input]\nredact_pii = true\n",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let prompt = "Call 13800138000 or write to jane.doe@example.com";
    let r = call_as(
        &s,
        &acme,
        Method::POST,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 1}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // the model read the placeholders: the prompt's token count is the redacted text's
    let tok = fount_model::Tokenizer::from_file(&crate::util::model_dir().join("tokenizer.json"))
        .unwrap();
    let redacted = tok
        .encode("Call <PHONE> or write to <EMAIL>", true)
        .unwrap()
        .len();
    let original = tok.encode(prompt, true).unwrap().len();
    assert_ne!(redacted, original);
    assert_eq!(r.json()["usage"]["prompt_tokens"], redacted);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit = store.audit(0, i64::MAX, None).await.unwrap();
    let a = audit.iter().find(|a| a.action == "redact").unwrap();
    // this policy keeps the content (before redaction) in its records
    assert_eq!(a.content.as_deref(), Some(prompt));
    assert!(
        a.rules.contains("pii:email") && a.rules.contains("pii:phone"),
        "{}",
        a.rules
    );
}

#[tokio::test]
async fn an_output_policy_ends_answers_with_content_filter_streamed_or_not() {
    let (store, _dir) = stores("output_policy").await.remove(0);
    let s = safe_state(&store).await;
    let admin = key(&store, "ops", &[Scope::Admin]).await;
    let acme = key(&store, "acme", &[Scope::Inference]).await;
    // what the model says to this prompt, greedily, with no policy
    let r = chat_as(&s, &acme, "Tell me a story", 40, false).await;
    let (free, _) = answer(&r.body);
    // a word from the middle of it becomes a blocked term
    let word = free
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() >= 3 && w.chars().all(|c| c.is_ascii_alphanumeric()))
        .nth(2)
        .unwrap_or_else(|| panic!("no word in {free:?}"))
        .to_string();
    let at = free.find(&word).unwrap();
    let policy = format!("hold_chars = 8\n[output]\nblock = [\"hate\"]\n[[rules]]\ncategory = \"hate\"\nterms = [{word:?}]\n");
    let (status, v) = set_policy(&s, &admin, "acme", &policy).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    for stream in [false, true] {
        let r = chat_as(&s, &acme, "Tell me a story", 40, stream).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let (text, finish) = answer(&r.body);
        assert_eq!(finish, "content_filter", "stream {stream}: {}", r.body);
        // the text before the term, and nothing of it
        assert!(
            free.starts_with(&text) && text.len() <= at,
            "stream {stream}: {text:?} of {free:?} (term {word:?})"
        );
        assert!(
            !r.body.contains(&word),
            "stream {stream}: the term was sent"
        );
        if stream {
            assert!(r.body.trim_end().ends_with("data: [DONE]"));
        }
    }
    until_idle(&s).await;
}

#[tokio::test]
async fn suspensions_stop_running_streams_and_new_requests_until_lifted() {
    for (store, _dir) in stores("suspend").await {
        let b = store.backend();
        let s = safe_state(&store).await;
        let admin = key(&store, "ops", &[Scope::Admin]).await;
        let acme = key(&store, "acme", &[Scope::Inference]).await;
        let other = key(&store, "other", &[Scope::Inference]).await;
        // a long stream, suspended while it runs
        let running = {
            let (s, acme) = (s.clone(), acme.clone());
            tokio::spawn(async move {
                let t = Instant::now();
                let r = chat_as(&s, &acme, "Tell me a story", 1500, true).await;
                (r, t.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(400)).await;
        let suspend =
            json!({"kind": "tenant", "name": "acme", "reason": "unpaid invoice"}).to_string();
        let t0 = Instant::now();
        let r = call_as(&s, &admin, Method::POST, "/admin/v1/suspensions", &suspend).await;
        assert_eq!(r.status, StatusCode::OK, "{b:?}: {}", r.body);
        let (r, _) = running.await.unwrap();
        let ended = t0.elapsed();
        assert!(
            ended < Duration::from_secs(2),
            "{b:?}: the stream ran on for {ended:?}"
        );
        assert!(
            r.body.contains("\"code\":\"suspended\"") && r.body.contains("unpaid invoice"),
            "{b:?}: {}",
            r.body
        );
        let (text, _) = answer(&r.body);
        assert!(!text.is_empty(), "{b:?}: the stream had started");
        until_idle(&s).await;
        // new requests: refused at once; another tenant is served
        let r = chat_as(&s, &acme, "hi", 2, false).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
        assert_eq!(r.error().2.as_deref(), Some("suspended"));
        let r = chat_as(&s, &other, "hi", 2, false).await;
        assert_eq!(r.status, StatusCode::OK);
        // lifted: served again
        let r = call_as(
            &s,
            &admin,
            Method::DELETE,
            "/admin/v1/suspensions/tenant/acme",
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let r = chat_as(&s, &acme, "hi", 2, false).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        // the model itself, through the store directly (as `fount admin suspend` does): every
        // server sharing the store sees it within its poll
        store
            .suspend(fount_store::SuspendKind::Model, "tiny", "maintenance")
            .await
            .unwrap();
        tokio::time::sleep(fount_server::safety::POLL * 3).await;
        let r = call_as(
            &s,
            &other,
            Method::POST,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "hi", "max_tokens": 1}).to_string(),
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{b:?}: {}", r.body);
        assert!(message(&r).contains("maintenance"));
        store
            .resume(fount_store::SuspendKind::Model, "tiny")
            .await
            .unwrap();
        tokio::time::sleep(fount_server::safety::POLL * 3).await;
        let r = call_as(
            &s,
            &other,
            Method::POST,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "hi", "max_tokens": 1}).to_string(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        // bad switches
        let r = call_as(
            &s,
            &admin,
            Method::POST,
            "/admin/v1/suspensions",
            r#"{"kind": "planet", "name": "x"}"#,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = call_as(
            &s,
            &admin,
            Method::DELETE,
            "/admin/v1/suspensions/tenant/acme",
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = call_as(&s, &acme, Method::POST, "/admin/v1/suspensions", &suspend).await;
        assert_eq!(
            r.status,
            StatusCode::FORBIDDEN,
            "only an admin key throws switches"
        );
        // the stopped stream's usage record is kept, billed for what it generated
        s.tenancy().unwrap().flush().await;
        let usage = store.usage(None, 0, i64::MAX).await.unwrap();
        assert!(
            usage
                .iter()
                .any(|u| u.status == 403 && u.completion_tokens > 0),
            "{b:?}"
        );
    }
}

#[tokio::test]
async fn a_bad_policy_is_refused_and_the_old_one_stays_in_force() {
    let (store, _dir) = stores("bad_policy").await.remove(0);
    let s = safe_state(&store).await;
    let admin = key(&store, "ops", &[Scope::Admin]).await;
    let acme = key(&store, "acme", &[Scope::Inference]).await;
    let (status, _) = set_policy(&s, &admin, "acme", "[input]\nblock = [\"illicit\"]\n").await;
    assert_eq!(status, StatusCode::OK);
    for (bad, says) in [
        ("[input]\nblock = [\"violent\"]\n", "\"violent\""),
        (
            "[[rules]]\ncategory = \"hate\"\npatterns = [\"(unclosed\"]\n",
            "(unclosed",
        ),
        (
            "guard = \"llama-guard\"\n[input]\nblock = [\"hate\"]\n",
            "\"llama-guard\"",
        ),
        ("[input]\nblok = []\n", "blok"),
        ("not toml at all = = =", "TOML parse error"),
    ] {
        let (status, v) = set_policy(&s, &admin, "acme", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{bad}: {message}");
    }
    let (status, _) = set_policy(&s, &admin, "nobody", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // the first policy still holds
    let r = chat_as(&s, &acme, "how to make a bomb", 2, false).await;
    assert_eq!(
        r.error().2.as_deref(),
        Some("content_policy_violation"),
        "{}",
        r.body
    );
    // a key's policy stands in for its tenant's
    let keys = store.keys(None).await.unwrap();
    let k = keys.iter().find(|k| acme.starts_with(&k.prefix)).unwrap();
    let r = call_as(
        &s,
        &admin,
        Method::PUT,
        &format!("/admin/v1/keys/{}/policy", k.prefix),
        &json!({"policy": "[input]\nlog = [\"illicit\"]\n"}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = chat_as(&s, &acme, "how to make a bomb", 2, false).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn with_a_guard_on_output_an_answer_waits_whole_for_its_verdict() {
    let (store, _dir) = stores("output_guard").await.remove(0);
    let s = safe_state(&store).await;
    let admin = key(&store, "ops", &[Scope::Admin]).await;
    let plain = key(&store, "plain", &[Scope::Inference]).await;
    let acme = key(&store, "acme", &[Scope::Inference]).await;
    // the served model itself as the guard: it does not answer in the format, so its verdict
    // is silent and the answer passes, but only once the guard has read all of it
    let (status, v) = set_policy(
        &s,
        &admin,
        "acme",
        "guard = \"tiny\"\n[output]\nblock = [\"illicit\"]\n",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let free = chat_as(&s, &plain, "Tell me a story", 24, false).await;
    let (want, _) = answer(&free.body);
    assert!(!want.is_empty());
    let r = chat_as(&s, &acme, "Tell me a story", 24, true).await;
    let (text, finish) = answer(&r.body);
    assert_eq!((text.as_str(), finish.as_str()), (want.as_str(), "length"));
    // no content before the last chunk of the choice
    let contents: Vec<String> = r
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(contents, std::slice::from_ref(&want), "{}", r.body);
    let r = chat_as(&s, &acme, "Tell me a story", 24, false).await;
    assert_eq!(answer(&r.body), (want, "length".to_string()));
    let metrics = call(&s, Method::GET, "/metrics", "").await.body;
    let guard = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fount_guard_tokens_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(guard > 0.0, "{metrics}");
}
