//! Continuous batching, paging, preemption, prefix caching, adapters, cancellation and `n`.

use fount_engine::{EngineConfig, Error, Request};

use crate::util::{collect, engine, prompt, solo_and_batched, wait_idle, write_adapter, Choice};

fn small_config() -> EngineConfig {
    EngineConfig {
        block_size: 16,
        kv_bytes: 64 << 20,
        max_step_tokens: 64,
        ..Default::default()
    }
}

fn alone(cfg: &EngineConfig, adapters: &[(String, std::path::PathBuf)], req: &Request) -> Choice {
    let e = engine(cfg.clone());
    for (name, dir) in adapters {
        e.adapters().register(name, dir.clone());
    }
    let mut s = e.submit(req.clone()).unwrap();
    collect(&mut s, 1).remove(0)
}

#[test]
fn sixty_four_requests_over_eight_adapters_match_their_solo_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let adapters: Vec<(String, std::path::PathBuf)> = (0..8)
        .map(|i| {
            let d = tmp.path().join(format!("a{i}"));
            write_adapter(&d, 4, 100 + i);
            (format!("a{i}"), d)
        })
        .collect();
    let cfg = small_config();
    let reqs: Vec<Request> = (0..64)
        .map(|i| {
            let mut r = Request::greedy(prompt(5 + (i * 7) % 50, i as u64), 6 + i % 7);
            r.adapter = if i % 9 == 8 {
                None
            } else {
                Some(format!("a{}", i % 9))
            };
            r
        })
        .collect();
    // the solo runs share one engine, one request at a time
    let solo_engine = engine(cfg.clone());
    for (name, dir) in &adapters {
        solo_engine.adapters().register(name, dir.clone());
    }
    let e = engine(cfg);
    for (name, dir) in &adapters {
        e.adapters().register(name, dir.clone());
    }
    let (solo, together) = solo_and_batched(&solo_engine, &e, &reqs);
    for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i} differs in a batch");
        assert!(!a.tokens.is_empty());
    }
    // adapters change the output
    assert_ne!(solo[0].tokens, solo[8].tokens);
    let m = wait_idle(&e);
    assert_eq!((m.running, m.blocks_used, m.waiting), (0, 0, 0), "{m:?}");
    assert_eq!(m.adapters_resident, 8);
    assert!(m.adapter_bytes > 0);
    let generated: usize = together.iter().map(|c| c.tokens.len()).sum();
    assert_eq!(m.generated_tokens as usize, generated);
    assert!(m.steps > 0 && m.tokens_per_second > 0.0);
    assert!(m.ttft_p50 > std::time::Duration::ZERO && m.ttft_p99 >= m.ttft_p50);
    assert!(m.itl_p50 > std::time::Duration::ZERO && m.itl_p99 >= m.itl_p50);
    assert_eq!(m.blocks_free, e.kv_blocks());
}

#[test]
fn preemption_completes_everything_with_the_same_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let adapters: Vec<(String, std::path::PathBuf)> = (0..3)
        .map(|i| {
            let d = tmp.path().join(format!("p{i}"));
            write_adapter(&d, 2, 300 + i);
            (format!("p{i}"), d)
        })
        .collect();
    let reqs: Vec<Request> = (0..16)
        .map(|i| {
            let mut r = Request::greedy(prompt(20 + 3 * i, 50 + i as u64), 12 + i % 9);
            r.adapter = (i % 2 == 1).then(|| format!("p{}", i % 3));
            r
        })
        .collect();
    let run = |cfg: EngineConfig| {
        let e = engine(cfg);
        for (name, dir) in &adapters {
            e.adapters().register(name, dir.clone());
        }
        let mut streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        let out: Vec<Choice> = streams
            .iter_mut()
            .map(|s| collect(s, 1).remove(0))
            .collect();
        (out, wait_idle(&e))
    };
    let (want, _) = run(small_config());
    // room for about two sequences at a time
    let bytes_per_block = 2 * 2 * 16 * 2 * 16 * 4; // layers · (k, v) · block · kv heads · head dim · f32
    let (got, m) = run(EngineConfig {
        kv_bytes: 9 * bytes_per_block * 2,
        ..small_config()
    });
    for (i, (a, b)) in want.iter().zip(&got).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}");
        assert_eq!(a.reason, b.reason, "request {i}");
    }
    assert!(
        m.preemptions > 0,
        "the budget should force preemption: {m:?}"
    );
    assert_eq!(m.blocks_used, 0);
}

/// Admits the shortest prompt first.
struct ShortestFirst(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

impl fount_engine::Admission for ShortestFirst {
    fn order(&mut self, queue: &[fount_engine::Queued]) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..queue.len()).collect();
        idx.sort_by_key(|&i| queue[i].prompt_tokens);
        if let Ok(mut seen) = self.0.lock() {
            seen.extend(idx.iter().map(|&i| queue[i].prompt_tokens));
        }
        idx
    }
}

/// An engine over the tiny model that runs one sequence at a time, admitting by `admission`.
fn one_at_a_time(admission: Box<dyn fount_engine::Admission>) -> fount_engine::Engine {
    let dir = crate::util::model_dir();
    let model =
        fount_model::Model::load(dir, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let tok = fount_model::Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let cfg = EngineConfig {
        max_running: 1,
        ..small_config()
    };
    fount_engine::Engine::start_with(model, tok, Vec::new(), cfg, admission).unwrap()
}

#[test]
fn admission_order_is_pluggable() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let e = one_at_a_time(Box::new(ShortestFirst(seen.clone())));
    // one sequence at a time: a long first request runs while the other two wait
    let first = e.submit(Request::greedy(prompt(30, 30), 300)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let later: Vec<_> = [20usize, 10]
        .iter()
        .map(|&n| e.submit(Request::greedy(prompt(n, n as u64), 2)).unwrap())
        .collect();
    let handles: Vec<_> = std::iter::once(first)
        .chain(later)
        .map(|mut s| {
            std::thread::spawn(move || {
                collect(&mut s, 1);
                std::time::Instant::now()
            })
        })
        .collect();
    let done: Vec<std::time::Instant> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        done[2] < done[1],
        "the shorter prompt, submitted last, is admitted first"
    );
    assert!(!seen.lock().unwrap().is_empty());
}

/// Completion order of ten requests of tenant `a` followed by one of tenant `b`, one sequence
/// running at a time, under `admission`.
fn finishing_order(admission: Box<dyn fount_engine::Admission>) -> String {
    let e = one_at_a_time(admission);
    let submit = |tenant: &str, seed: u64| {
        let mut r = Request::greedy(prompt(12, seed), 24);
        r.cache_salt = tenant.into();
        e.submit(r).unwrap()
    };
    let mut streams: Vec<(char, _)> = (0..10).map(|i| ('a', submit("a", i))).collect();
    streams.push(('b', submit("b", 99)));
    let (tx, rx) = std::sync::mpsc::channel();
    for (tenant, mut s) in streams {
        let tx = tx.clone();
        std::thread::spawn(move || {
            collect(&mut s, 1);
            let _ = tx.send(tenant);
        });
    }
    drop(tx);
    rx.iter().collect()
}

#[test]
fn a_flooding_tenant_cannot_hold_back_another_under_the_fair_queue() {
    // first come, first served: b waits behind all ten
    assert_eq!(finishing_order(Box::new(fount_engine::Fcfs)), "aaaaaaaaaab");
    // fair: b starts level with a and runs as soon as the running request is done
    let order = finishing_order(Box::new(fount_engine::fair::FairQueue::default()));
    let b = order.find('b').unwrap();
    assert!(b <= 2, "b finished at {b} in {order}");
}

#[test]
fn a_sequence_that_outgrows_the_pool_ends_with_length() {
    let bytes_per_block = 2 * 2 * 16 * 2 * 16 * 4;
    let e = engine(EngineConfig {
        kv_bytes: 4 * bytes_per_block,
        ..small_config()
    });
    let mut s = e.submit(Request::greedy(prompt(20, 4), 200)).unwrap();
    let c = collect(&mut s, 1).remove(0);
    assert_eq!(c.reason, Some(fount_engine::FinishReason::Length));
    assert!(
        c.tokens.len() >= 20 && c.tokens.len() < 64,
        "{}",
        c.tokens.len()
    );
    assert_eq!(wait_idle(&e).blocks_used, 0);
}

#[test]
fn prefix_cache_is_shared_only_within_salt_and_adapter_version() {
    let tmp = tempfile::tempdir().unwrap();
    write_adapter(&tmp.path().join("x1"), 4, 1);
    write_adapter(&tmp.path().join("x2"), 4, 2);
    let e = engine(small_config());
    e.adapters().register("x", tmp.path().join("x1"));
    e.adapters().register("y", tmp.path().join("x1"));
    let base = prompt(100, 7);
    let run = |p: Vec<u32>, adapter: Option<&str>, salt: &str| {
        let mut r = Request::greedy(p, 4);
        r.adapter = adapter.map(String::from);
        r.cache_salt = salt.into();
        collect(&mut e.submit(r).unwrap(), 1).remove(0)
    };
    let first = run(base.clone(), None, "tenant-a");
    assert_eq!(first.usage.cached_tokens, 0);
    let mut shared = base[..96].to_vec();
    shared.extend(prompt(20, 8));
    let second = run(shared.clone(), None, "tenant-a");
    assert_eq!(
        second.usage.cached_tokens, 96,
        "six full blocks of the shared prefix"
    );
    assert_eq!(second.usage.prompt_tokens, 116);
    assert_eq!(
        run(shared.clone(), None, "tenant-b").usage.cached_tokens,
        0,
        "another salt"
    );
    assert_eq!(
        run(shared.clone(), Some("x"), "tenant-a")
            .usage
            .cached_tokens,
        0,
        "another adapter"
    );
    // the previous run cached its whole prompt and what it generated: 7 full blocks
    assert_eq!(
        run(shared.clone(), Some("x"), "tenant-a")
            .usage
            .cached_tokens,
        112,
        "same adapter"
    );
    assert_eq!(
        run(shared.clone(), Some("y"), "tenant-a")
            .usage
            .cached_tokens,
        0,
        "same weights, another adapter name"
    );
    e.adapters().register("x", tmp.path().join("x2"));
    assert_eq!(
        run(shared.clone(), Some("x"), "tenant-a")
            .usage
            .cached_tokens,
        0,
        "another adapter version"
    );
    // a cached prefix gives the same tokens as computing it
    let fresh = engine(small_config());
    let mut r = Request::greedy(shared, 4);
    r.cache_salt = "tenant-a".into();
    assert_eq!(
        collect(&mut fresh.submit(r).unwrap(), 1)[0].tokens,
        second.tokens
    );
    assert!(e.metrics().prefix_hit_rate > 0.0);
}

#[test]
fn replacing_an_adapter_does_not_touch_running_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let (v1, v2) = (tmp.path().join("v1"), tmp.path().join("v2"));
    write_adapter(&v1, 4, 11);
    write_adapter(&v2, 4, 12);
    let mut req = Request::greedy(prompt(20, 3), 30);
    req.adapter = Some("m".into());
    let cfg = small_config();
    let want_v1 = alone(&cfg, &[("m".into(), v1.clone())], &req);
    let want_v2 = alone(&cfg, &[("m".into(), v2.clone())], &req);
    assert_ne!(want_v1.tokens, want_v2.tokens);

    let e = engine(cfg);
    e.adapters().register("m", v1);
    let mut running = e.submit(req.clone()).unwrap();
    // wait for the first token, then replace the adapter
    let first = running.next_blocking().unwrap();
    assert!(matches!(first, fount_engine::Event::Token { .. }));
    e.adapters().register("m", v2);
    let mut later = e.submit(req).unwrap();
    let mut rest = collect(&mut running, 1).remove(0);
    if let fount_engine::Event::Token { token, .. } = first {
        rest.tokens.insert(0, token);
    }
    assert_eq!(
        rest.tokens, want_v1.tokens,
        "the running stream stays on version 1"
    );
    assert_eq!(
        collect(&mut later, 1)[0].tokens,
        want_v2.tokens,
        "new requests use version 2"
    );
}

#[test]
fn cancelling_frees_blocks_and_n_shares_the_prompt() {
    let e = engine(small_config());
    let mut s = e.submit(Request::greedy(prompt(40, 9), 500)).unwrap();
    for _ in 0..3 {
        s.next_blocking().unwrap();
    }
    assert!(e.metrics().blocks_used > 0);
    drop(s);
    let m = wait_idle(&e);
    assert_eq!((m.running, m.blocks_used), (0, 0), "{m:?}");

    let mut r = Request::greedy(prompt(40, 10), 8);
    r.n = 3;
    r.sampling.temperature = 1.0;
    r.sampling.seed = 5;
    r.logprobs = Some(3);
    let mut s = e.submit(r).unwrap();
    let choices = collect(&mut s, 3);
    assert_eq!(choices[0].usage.cached_tokens, 0);
    for c in &choices[1..] {
        assert_eq!(
            c.usage.cached_tokens, 32,
            "choices after the first reuse the prompt's full blocks"
        );
    }
    assert!(choices.iter().all(|c| c.tokens.len() == 8));
    assert!(
        choices[0].tokens != choices[1].tokens || choices[1].tokens != choices[2].tokens,
        "seeds differ per choice"
    );
}

#[test]
fn logprobs_and_stop_strings() {
    let e = engine(small_config());
    let mut r = Request::greedy(prompt(12, 21), 10);
    r.logprobs = Some(2);
    let mut s = e.submit(r.clone()).unwrap();
    let mut seen = 0;
    while let Some(ev) = s.next_blocking() {
        if let fount_engine::Event::Token {
            token,
            logprob: Some(lp),
            ..
        } = ev
        {
            // greedy: the chosen token is the most likely one
            assert_eq!(lp.top.len(), 2);
            assert_eq!(lp.top[0].0, token);
            assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6 && lp.logprob <= 0.0);
            assert!(lp.top[0].1 >= lp.top[1].1);
            seen += 1;
        }
    }
    assert_eq!(seen, 10);
    // stop at a string taken from the unconstrained output
    let full = collect(
        &mut e.submit(Request::greedy(prompt(12, 21), 10)).unwrap(),
        1,
    )
    .remove(0);
    let chars: Vec<char> = full.text.chars().collect();
    if chars.len() > 6 {
        let stop: String = chars[3..6].iter().collect();
        let mut r = Request::greedy(prompt(12, 21), 10);
        r.stop = vec![stop.clone()];
        let cut = collect(&mut e.submit(r).unwrap(), 1).remove(0);
        assert!(
            full.text.starts_with(&cut.text) && !cut.text.contains(&stop),
            "{:?} / {:?}",
            cut.text,
            full.text
        );
        assert_eq!(cut.reason, Some(fount_engine::FinishReason::Stop));
    }
}

#[test]
fn bad_requests_are_refused_clearly() {
    let e = engine(small_config());
    let err = |r: Request| e.submit(r).unwrap_err().to_string();
    assert!(err(Request::greedy(vec![], 4)).contains("empty"));
    assert!(err(Request::greedy(vec![1, 99_999], 4)).contains("vocabulary"));
    assert!(err(Request::greedy(prompt(5000, 1), 4)).contains("context"));
    let mut r = Request::greedy(prompt(5, 1), 4);
    r.n = 0;
    assert!(err(r).contains("n must be"));
    let mut r = Request::greedy(prompt(5, 1), 4);
    r.adapter = Some("nope".into());
    assert!(matches!(e.submit(r).unwrap_err(), Error::UnknownAdapter(_)));
    let mut r = Request::greedy(prompt(5, 1), 4);
    r.sampling.temperature = -1.0;
    assert!(err(r).contains("temperature"));
    // an adapter whose files are broken fails that request only
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("adapter_config.json"), "{}").unwrap();
    e.adapters().register("broken", tmp.path());
    let mut r = Request::greedy(prompt(5, 1), 4);
    r.adapter = Some("broken".into());
    let mut s = e.submit(r).unwrap();
    assert!(
        matches!(s.next_blocking(), Some(fount_engine::Event::Error(m)) if m.contains("broken"))
    );
    let ok = collect(&mut e.submit(Request::greedy(prompt(5, 1), 3)).unwrap(), 1);
    assert_eq!(ok[0].tokens.len(), 3);
}

#[test]
fn the_meter_counts_what_the_streams_report_once_the_engine_lets_go() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let bytes_per_block = 2 * 2 * 16 * 2 * 16 * 4;
    // a small pool: preemption and recomputation must not count prompts twice
    let e = engine(EngineConfig {
        kv_bytes: 9 * bytes_per_block * 2,
        ..small_config()
    });
    let finals = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let meter = |i: usize| {
        let (finals, calls) = (finals.clone(), calls.clone());
        fount_engine::RequestMeter::on_final(move |m| {
            calls.fetch_add(1, Ordering::SeqCst);
            finals.lock().unwrap().push((i, m.counts()));
        })
    };
    let mut expected = Vec::new();
    let mut streams = Vec::new();
    for i in 0..12 {
        let mut r = Request::greedy(prompt(20 + 3 * i, 70 + i as u64), 10 + i % 7);
        r.n = 1 + i % 3;
        r.sampling.temperature = 1.0;
        r.meter = Some(meter(i));
        streams.push((i, r.n, e.submit(r).unwrap()));
    }
    for (i, n, mut s) in streams {
        let choices = collect(&mut s, n);
        let prompt_tokens = choices[0].usage.prompt_tokens as u64;
        let cached = choices[0].usage.cached_tokens as u64;
        let completion: u64 = choices
            .iter()
            .map(|c| c.usage.completion_tokens as u64)
            .sum();
        expected.push((i, (prompt_tokens, cached, completion)));
    }
    // a cancelled stream: counted up to where the engine stopped
    let mut s = e
        .submit({
            let mut r = Request::greedy(prompt(30, 99), 400);
            r.meter = Some(meter(99));
            r
        })
        .unwrap();
    let mut seen = 0;
    while seen < 5 {
        if let Some(fount_engine::Event::Token { .. }) = s.next_blocking() {
            seen += 1;
        }
    }
    drop(s);
    let m = wait_idle(&e);
    assert!(m.preemptions > 0, "the pool should force preemption: {m:?}");
    let mut got = finals.lock().unwrap().clone();
    got.sort();
    let cancelled = got.pop().unwrap();
    assert_eq!(
        got, expected,
        "final counts equal the usage each stream reported"
    );
    assert_eq!(cancelled.0, 99);
    assert!(
        (5..400).contains(&cancelled.1 .2),
        "the cancelled request is counted to where it stopped: {cancelled:?}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        13,
        "each callback ran exactly once"
    );
}

#[test]
fn quantised_weights_give_every_request_its_solo_tokens_in_a_batch() {
    use candle_core::DType;
    use fount_model::init::{init_model, preset, InitOptions};
    use fount_model::quantize::{quantize, QuantType};
    use fount_model::{Arch, Model, Tokenizer};
    // rows of 256 values: the K types run on whole super-blocks (Q4_K, and Q6_K for the tied
    // embedding and some attn_v/ffn_down), Q8_0 and F16 on fount's own kernels
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("small");
    let opts = InitOptions {
        std: 0.2,
        ..Default::default()
    };
    init_model(
        Arch::Qwen2,
        &preset(Arch::Qwen2, "small").unwrap(),
        &opts,
        &dir,
    )
    .unwrap();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    // prompts long enough that prefill chunks pass 32 rows (the GEMM and AMX thresholds)
    let reqs: Vec<Request> = (0..12)
        .map(|i| Request::greedy(prompt(3 + (i * 11) % 60, 50 + i as u64), 5 + i % 4))
        .collect();
    for t in ["q4_k_m", "q8_0", "f16"] {
        let file = tmp.path().join(format!("small.{t}.gguf"));
        quantize(&dir, &file, QuantType::parse(t).unwrap()).unwrap();
        let start = || {
            let model = Model::load_gguf(&file).unwrap();
            assert_eq!(model.dtype(), DType::F32);
            assert!(model.device().is_cpu());
            fount_engine::Engine::start(model, tok.clone(), Vec::new(), small_config()).unwrap()
        };
        let (solo, together) = solo_and_batched(&start(), &start(), &reqs);
        for (i, (a, b)) in solo.iter().zip(&together).enumerate() {
            assert!(!a.tokens.is_empty());
            assert_eq!(a.tokens, b.tokens, "{t}: request {i} differs in a batch");
        }
    }
}
