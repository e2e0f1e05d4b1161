use crate::util::{fount_err, fount_ok, tiny_model};

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn init_then_generate_streams_only_the_text() {
    let dir = tmp();
    let m = dir.path().join("m");
    let m = m.display().to_string();
    tiny_model("qwen2", std::path::Path::new(&m));
    let hello = [
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hello",
        "--max-tokens",
        "12",
    ];
    let (out, err) = fount_ok(&hello);
    assert!(err.contains("prefill:") && err.contains("decode:"), "{err}");
    assert!(!out.contains("prefill"), "speed must go to stderr: {out}");
    // Greedy is deterministic.
    let (again, _) = fount_ok(&hello);
    assert_eq!(out, again);
    // Same seed, same sample; the chat template path works.
    let args = [
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hi",
        "--chat",
        "--max-tokens",
        "16",
        "--temperature",
        "1.0",
        "--seed",
        "5",
    ];
    assert_eq!(fount_ok(&args).0, fount_ok(&args).0);
}

#[test]
fn stop_strings_cut_the_output() {
    let dir = tmp();
    let m = dir.path().join("m").display().to_string();
    tiny_model("llama", std::path::Path::new(&m));
    let (full, _) = fount_ok(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "The",
        "--max-tokens",
        "40",
    ]);
    let full = full.trim_end_matches('\n').to_string();
    // Pick a stop string from the middle of what greedy decoding produces.
    let chars: Vec<char> = full.chars().collect();
    if chars.len() < 6 {
        return; // nothing to cut in this model's output
    }
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let (cut, err) = fount_ok(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "The",
        "--max-tokens",
        "40",
        "--stop",
        &stop,
    ]);
    let cut = cut.trim_end_matches('\n');
    assert!(full.starts_with(cut), "{cut:?} is not a prefix of {full:?}");
    assert!(!cut.contains(&stop), "{cut:?} contains the stop {stop:?}");
    assert!(err.contains("finish: Stop"), "{err}");
}

#[test]
fn errors_are_clear() {
    let dir = tmp();
    let missing = dir.path().join("nope").display().to_string();
    let err = fount_err(&["generate", "--model", &missing, "--prompt", "x"]);
    assert!(err.contains("error:") && err.contains("nope"), "{err}");

    let m = dir.path().join("m").display().to_string();
    // Qwen2's tokenizer adds no BOS, so "" encodes to no tokens at all.
    tiny_model("qwen2", std::path::Path::new(&m));
    let err = fount_err(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "",
        "--max-tokens",
        "3",
    ]);
    assert!(err.contains("prompt is empty"), "{err}");

    let err = fount_err(&["model", "init", "--arch", "gpt2", "--out", &m]);
    assert!(err.contains("gpt2"), "{err}");
    let err = fount_err(&[
        "model",
        "init",
        "--arch",
        "llama",
        "--preset",
        "huge",
        "--out",
        &format!("{m}2"),
    ]);
    assert!(err.contains("huge") && err.contains("tiny"), "{err}");
    let err = fount_err(&["model", "init", "--arch", "llama", "--out", &m]);
    assert!(err.contains("already holds a model"), "{err}");
    let err = fount_err(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "x",
        "--temperature",
        "5",
    ]);
    assert!(err.contains("temperature"), "{err}");
}

#[test]
fn chat_needs_a_template() {
    let dir = tmp();
    let m = dir.path().join("m");
    tiny_model("qwen2", &m);
    std::fs::remove_file(m.join("tokenizer_config.json")).unwrap_or_else(|e| panic!("{e}"));
    let err = fount_err(&[
        "generate",
        "--model",
        &m.display().to_string(),
        "--prompt",
        "x",
        "--chat",
    ]);
    assert!(err.contains("chat template"), "{err}");
}

#[test]
fn generate_with_an_adapter() {
    let dir = tmp();
    let m = dir.path().join("m");
    tiny_model("llama", &m);
    let cfg = fount_model::Model::load(&m, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}"))
        .config()
        .clone();
    let adapter = dir.path().join("adapter");
    fount_model::init::init_lora(&cfg, 4, 0.5, 7, &adapter).unwrap_or_else(|e| panic!("{e}"));
    let ms = m.display().to_string();
    let ad = adapter.display().to_string();
    let base = [
        "generate",
        "--model",
        &ms,
        "--prompt",
        "The",
        "--max-tokens",
        "16",
    ];
    let (plain, _) = fount_ok(&base);
    let mut with = base.to_vec();
    with.extend(["--adapter", &ad]);
    let (adapted, _) = fount_ok(&with);
    assert_ne!(plain, adapted, "the adapter changes the output");
    assert_eq!(adapted, fount_ok(&with).0, "greedy is deterministic");
    let missing = dir.path().join("nope").display().to_string();
    let mut bad = base.to_vec();
    bad.extend(["--adapter", &missing]);
    let err = fount_err(&bad);
    assert!(err.contains("adapter") && err.contains("nope"), "{err}");
}

#[test]
fn artifacts_go_in_and_out_checked_and_bad_input_is_named() {
    let d = tmp();
    let store = d.path().join("objects").display().to_string();
    let data = d.path().join("data").display().to_string();
    let model = d.path().join("m");
    tiny_model("qwen2", &model);
    let m = model.display().to_string();
    let base = [
        "artifacts",
        "--artifacts",
        store.as_str(),
        "--data-dir",
        data.as_str(),
    ];
    let with =
        |rest: &[&str]| -> Vec<String> { base.iter().chain(rest).map(|s| s.to_string()).collect() };
    let (put, _) = fount_ok(&refs(&with(&["put", &m, "models/tiny"])));
    let digest = put
        .trim()
        .split('\t')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(
        put.starts_with("artifacts:models/tiny\t") && digest.len() == 64,
        "{put}"
    );
    let (listed, _) = fount_ok(&refs(&with(&["ls", "models/tiny"])));
    assert!(
        listed.contains("config.json") && listed.contains("fount-manifest.json"),
        "{listed}"
    );
    let (got, _) = fount_ok(&refs(&with(&["get", "models/tiny", "--digest", &digest])));
    let got = std::path::PathBuf::from(got.trim());
    assert_eq!(
        std::fs::read(got.join("config.json")).unwrap(),
        std::fs::read(model.join("config.json")).unwrap()
    );
    // the model serves from there: `generate` reads the fetched directory
    let (text, _) = fount_ok(&[
        "generate",
        "--model",
        got.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
    ]);
    assert!(!text.is_empty());
    // errors name what is wrong
    let e = fount_err(&refs(&with(&["get", "models/tiny", "--digest", "00ff"])));
    assert!(e.contains("not the 00ff expected"), "{e}");
    let e = fount_err(&refs(&with(&["get", "models/none"])));
    assert!(e.contains("not found"), "{e}");
    let e = fount_err(&refs(&with(&["put", "/no/such/dir", "x"])));
    assert!(e.contains("no such file or directory"), "{e}");
    let e = fount_err(&refs(&with(&["put", &m, "../escape"])));
    assert!(e.contains("not an artifact key"), "{e}");
    let e = fount_err(&["artifacts", "--artifacts", "gs://bucket", "ls", "x"]);
    assert!(e.contains("unsupported artifacts URL"), "{e}");
    let e = fount_err(&[
        "serve",
        "--model",
        "artifacts:models/tiny",
        "--data-dir",
        &data,
    ]);
    assert!(e.contains("give --artifacts"), "{e}");
}

/// `fount finetune` reads its base model, its data and its validation file from the artifacts
/// store (so a pool job runs on any node): the adapter is byte for byte the one trained from the
/// same local files; a missing key, or `artifacts:` without a store, is named.
#[test]
fn finetune_reads_its_inputs_from_the_artifacts_store() {
    let d = tmp();
    let p = |name: &str| d.path().join(name).display().to_string();
    let (store, data) = (p("objects"), p("data"));
    tiny_model("qwen2", &d.path().join("m"));
    let chat = |from: usize| -> String {
        (from..from + 24)
            .map(|i| {
                format!(
                    "{{\"messages\":[{{\"role\":\"user\",\"content\":\"say {i}\"}},{{\"role\":\"assistant\",\"content\":\"{i}\"}}]}}\n"
                )
            })
            .collect()
    };
    std::fs::write(p("train.jsonl"), chat(0)).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(p("valid.jsonl"), chat(100)).unwrap_or_else(|e| panic!("{e}"));
    let put = |path: &str, key: &str| {
        fount_ok(&[
            "artifacts",
            "--artifacts",
            &store,
            "--data-dir",
            &data,
            "put",
            path,
            key,
        ]);
    };
    put(&p("m"), "models/tiny");
    put(&p("train.jsonl"), "sets/train.jsonl");
    put(&p("valid.jsonl"), "sets/valid.jsonl");
    let settings = "epochs = 1.0\nr = 2\nseed = 3\n";
    let config = |name: &str, valid: &str| {
        let text = format!("{settings}validation_file = {valid:?}\n");
        std::fs::write(p(name), text).unwrap_or_else(|e| panic!("{e}"));
        p(name)
    };
    let local_cfg = config("local.toml", &p("valid.jsonl"));
    let stored_cfg = config("stored.toml", "artifacts:sets/valid.jsonl");
    let finetune = |base: &str, train: &str, cfg: &str, out: &str, store: Option<&str>| {
        let mut args = vec!["finetune", "--base", base, "--data", train, "--out", out];
        args.extend(["--config", cfg, "--data-dir", &data, "--no-ledger"]);
        if let Some(url) = store {
            args.extend(["--artifacts", url]);
        }
        crate::util::fount(&args)
    };
    let ok = |o: std::process::Output| {
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{err}");
        err
    };
    ok(finetune(
        &p("m"),
        &p("train.jsonl"),
        &local_cfg,
        &p("local"),
        None,
    ));
    let said = ok(crate::util::fount(&[
        "finetune",
        "--base",
        "artifacts:models/tiny",
        "--data",
        "artifacts:sets/train.jsonl",
        "--out",
        &p("stored"),
        "--config",
        &stored_cfg,
        "--data-dir",
        &data,
        "--artifacts",
        &store,
        "--publish",
        "adapters/tiny-ft",
    ]));
    assert!(
        said.contains("24 held out") && said.contains("held-out loss"),
        "the validation file was not read: {said}"
    );
    let weights = |dir: &str| {
        std::fs::read(d.path().join(dir).join("adapter_model.safetensors"))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
    };
    assert!(
        weights("local") == weights("stored"),
        "the adapter trained from the store differs from the one trained from local files"
    );
    // the adapter, not its checkpoints, is published with its provenance; it fetches whole
    assert!(
        said.contains("published to artifacts:adapters/tiny-ft"),
        "{said}"
    );
    let (listed, _) = fount_ok(&["artifacts", "--artifacts", &store, "ls", "adapters/tiny-ft"]);
    assert!(
        listed.contains("adapter_model.safetensors")
            && listed.contains("provenance.json")
            && !listed.contains("checkpoints"),
        "{listed}"
    );
    let (got, _) = fount_ok(&[
        "artifacts",
        "--artifacts",
        &store,
        "--data-dir",
        &data,
        "get",
        "adapters/tiny-ft",
    ]);
    assert!(
        std::fs::read(std::path::Path::new(got.trim()).join("adapter_model.safetensors"))
            .is_ok_and(|w| w == weights("stored"))
    );
    // errors name the input
    let e = fount_err(&[
        "finetune",
        "--base",
        "artifacts:models/tiny",
        "--data",
        &p("train.jsonl"),
        "--out",
        &p("x"),
        "--data-dir",
        &data,
    ]);
    assert!(
        e.contains("--base artifacts:models/tiny: give --artifacts"),
        "{e}"
    );
    // publishing needs a store, and a key it accepts: both refused before any training
    let publish = |key: &str, store: Option<&str>| {
        let (m, t, x) = (p("m"), p("train.jsonl"), p("x"));
        let mut args = vec!["finetune", "--base", &m, "--data", &t, "--out", &x];
        args.extend(["--data-dir", &data, "--publish", key]);
        args.extend(store.map(|u| ["--artifacts", u]).iter().flatten());
        fount_err(&args)
    };
    let e = publish("adapters/x", None);
    assert!(e.contains("--publish adapters/x: give --artifacts"), "{e}");
    let e = publish("../x", Some(&store));
    assert!(
        e.contains("--publish ../x") && e.contains("not an artifact key"),
        "{e}"
    );
    let e = String::from_utf8_lossy(
        &finetune(
            "artifacts:models/tiny",
            "artifacts:sets/none.jsonl",
            &local_cfg,
            &p("x"),
            Some(&store),
        )
        .stderr,
    )
    .into_owned();
    assert!(
        e.contains("fetching --data artifacts:sets/none.jsonl") && e.contains("not found"),
        "{e}"
    );
    assert!(
        !d.path().join("x").exists(),
        "a failed fetch wrote an adapter"
    );
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}
