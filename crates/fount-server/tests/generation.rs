use axum::http::StatusCode;
use serde_json::json;

use crate::util::{mask, post, state, until_idle};

fn chat_body(extra: serde_json::Value) -> serde_json::Value {
    let mut body = json!({
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello."}]}
        ],
        "max_tokens": 6,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn masked_events(events: &[String]) -> String {
    events
        .iter()
        .map(|e| {
            if e == "[DONE]" {
                e.clone()
            } else {
                serde_json::to_string(&serde_json::from_str::<serde_json::Value>(&mask(e)).unwrap())
                    .unwrap()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn chat_answers_as_openai_does() {
    let s = state();
    let r = post(&s, "/v1/chat/completions", chat_body(json!({}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let j = r.json();
    assert_eq!(j["object"], "chat.completion");
    assert!(j["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(j["choices"][0]["finish_reason"], "length");
    assert_eq!(j["usage"]["completion_tokens"], 6);
    assert_eq!(
        j["usage"]["total_tokens"].as_u64(),
        Some(j["usage"]["prompt_tokens"].as_u64().unwrap() + 6)
    );
    insta::assert_snapshot!("chat", mask(&r.body));
    // the same request streamed: the same text, chunk by chunk
    let st = post(
        &s,
        "/v1/chat/completions",
        chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
    )
    .await;
    assert_eq!(st.status, StatusCode::OK);
    assert_eq!(st.headers["content-type"], "text/event-stream");
    let events = st.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let c: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(
            c.get("usage").is_some(),
            "include_usage puts usage on every chunk: {e}"
        );
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(
        text,
        j["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let usage_chunk: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 6);
    insta::assert_snapshot!("chat_stream", masked_events(&events));
    until_idle(&s).await;
}

#[tokio::test]
async fn n_choices_stop_strings_and_logprobs() {
    let s = state();
    // n = 3, sampled with a seed: reproducible
    let body = chat_body(json!({"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 8}));
    let a = post(&s, "/v1/chat/completions", body.clone()).await.json();
    let b = post(&s, "/v1/chat/completions", body).await.json();
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(
        a["choices"], b["choices"],
        "the same seed gives the same choices"
    );
    let texts: Vec<&str> = a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert!(
        texts[0] != texts[1] || texts[1] != texts[2],
        "choices differ: {texts:?}"
    );
    // prompt counted once, completions summed
    assert_eq!(a["usage"]["completion_tokens"], 24);
    // a stop string taken from the greedy output ends the text just before it
    let greedy = post(
        &s,
        "/v1/chat/completions",
        chat_body(json!({"max_tokens": 12})),
    )
    .await
    .json();
    let full = greedy["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let cut = full.char_indices().nth(3).map_or(full.len(), |(i, _)| i);
    let stop: String = full[cut..].chars().take(2).collect();
    if !stop.is_empty() && !full[..cut].contains(&stop) {
        let r = post(
            &s,
            "/v1/chat/completions",
            chat_body(json!({"max_tokens": 12, "stop": stop})),
        )
        .await
        .json();
        assert_eq!(
            r["choices"][0]["message"]["content"].as_str().unwrap(),
            &full[..cut],
            "stop {stop:?} in {full:?}"
        );
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }
    // logprobs with alternatives
    let r = post(
        &s,
        "/v1/chat/completions",
        chat_body(json!({"logprobs": true, "top_logprobs": 3})),
    )
    .await
    .json();
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 6);
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // greedy: the chosen token is the most likely one
        assert!(
            (top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6,
            "{t}"
        );
        assert!(!t["bytes"].as_array().unwrap().is_empty());
    }
    until_idle(&s).await;
}

#[tokio::test]
async fn completions_answer_as_openai_does() {
    let s = state();
    let body = json!({"model": "tiny", "prompt": ["The cat", "A dog"], "n": 2, "max_tokens": 5, "temperature": 0, "logprobs": 2});
    let r = post(&s, "/v1/completions", body.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let j = r.json();
    assert_eq!(j["object"], "text_completion");
    let choices = j["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    // greedy: both choices of a prompt agree
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(choices[2]["text"], choices[3]["text"]);
    assert_eq!(
        choices[0]["logprobs"]["tokens"].as_array().unwrap().len(),
        5
    );
    insta::assert_snapshot!("completion", mask(&r.body));
    // streamed
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["n"] = json!(1);
    sb["prompt"] = json!("The cat");
    let st = post(&s, "/v1/completions", sb).await;
    let events = st.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = String::new();
    for e in &events[..events.len() - 1] {
        let c: serde_json::Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "text_completion");
        assert!(
            c.get("usage").is_none(),
            "no usage without include_usage: {e}"
        );
        text.push_str(c["choices"][0]["text"].as_str().unwrap());
    }
    assert_eq!(text, choices[0]["text"].as_str().unwrap());
    insta::assert_snapshot!("completion_stream", masked_events(&events));
    // token-id prompts are taken as they are
    let r = post(
        &s,
        "/v1/completions",
        json!({"model": "tiny", "prompt": [[1, 2, 3], [4, 5]], "max_tokens": 2}),
    )
    .await
    .json();
    assert_eq!(r["usage"]["prompt_tokens"], 5);
    until_idle(&s).await;
}

#[tokio::test]
async fn a_repeated_prompt_reports_cached_tokens() {
    let s = state();
    let long = "the quick brown fox jumps over the lazy dog ".repeat(8);
    let body = json!({"model": "tiny", "prompt": long, "max_tokens": 2, "temperature": 0});
    let first = post(&s, "/v1/completions", body.clone()).await.json();
    let second = post(&s, "/v1/completions", body).await.json();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 16, "{second}");
}

#[tokio::test]
async fn best_of_returns_the_most_likely_choices() {
    let s = state();
    let ask = |extra: serde_json::Value| {
        let mut b = json!({"model": "tiny", "prompt": "Once upon", "max_tokens": 6, "temperature": 1.0, "seed": 11});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    // the three candidates best_of = 3 draws from, with their log-probabilities
    let all = post(&s, "/v1/completions", ask(json!({"n": 3, "logprobs": 0})))
        .await
        .json();
    let score = |c: &serde_json::Value| -> f64 {
        c["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum()
    };
    let mut ranked: Vec<&serde_json::Value> = all["choices"].as_array().unwrap().iter().collect();
    ranked.sort_by(|a, b| score(b).total_cmp(&score(a)));
    let best = post(&s, "/v1/completions", ask(json!({"best_of": 3})))
        .await
        .json();
    let choices = best["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["text"], ranked[0]["text"], "{best} vs {all}");
    assert!(
        choices[0]["logprobs"].is_null(),
        "log-probabilities only when asked"
    );
    // every candidate's tokens are billed
    assert_eq!(
        best["usage"]["completion_tokens"],
        all["usage"]["completion_tokens"]
    );
    let two = post(
        &s,
        "/v1/completions",
        ask(json!({"best_of": 3, "n": 2, "logprobs": 1})),
    )
    .await
    .json();
    let texts: Vec<&serde_json::Value> = two["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["text"])
        .collect();
    assert_eq!(texts, [&ranked[0]["text"], &ranked[1]["text"]]);
    assert_eq!(two["choices"][1]["index"], 1);
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_request() {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let s = state();
    // uncancelled, each request would generate exactly 1500 tokens
    let long = json!({"model": "tiny", "prompt": "Once", "max_tokens": 1500, "temperature": 1.0,
        "stream": true, "logit_bias": crate::util::no_eos()});
    let req = axum::http::Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(long.to_string()))
        .unwrap();
    let res = fount_server::app(s.clone()).oneshot(req).await.unwrap();
    let mut body = res.into_body();
    // read a few events, then hang up
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    assert!(s.engine().metrics().running >= 1, "the stream is running");
    drop(body);
    until_idle(&s).await;
    let generated = s.engine().metrics().generated_tokens;
    assert!(
        generated < 1500,
        "the stream stopped early: {generated} tokens"
    );
    // a non-streamed request whose client goes away
    let mut blocking = long.clone();
    blocking["stream"] = json!(false);
    let s2 = s.clone();
    let task = tokio::spawn(async move { post(&s2, "/v1/completions", blocking).await });
    while s.engine().metrics().running == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    task.abort();
    until_idle(&s).await;
    let more = s.engine().metrics().generated_tokens - generated;
    assert!(more < 1500, "the request stopped early: {more} tokens");
}
