use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::fount_ok;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// `fount data synth` → `fount data run` → `fount model init --tokenizer`: shards and a tiny
/// Qwen2 that speaks their tokenizer.
fn synth_model(dir: &Path) -> (PathBuf, PathBuf) {
    fount_ok(&[
        "data",
        "synth",
        "--out",
        &s(&dir.join("synth")),
        "--docs",
        "3000",
        "--seed",
        "1",
    ]);
    fount_ok(&[
        "data",
        "run",
        "--input",
        &s(&dir.join("synth/corpus")),
        "--out",
        &s(&dir.join("curated")),
        "--vocab-size",
        "1024",
    ]);
    let model = dir.join("model");
    fount_ok(&[
        "model",
        "init",
        "--arch",
        "qwen2",
        "--preset",
        "tiny",
        "--tokenizer",
        &s(&dir.join("curated/tokenizer.json")),
        "--out",
        &s(&model),
    ]);
    (model, dir.join("curated/shards"))
}

fn write_config(path: &Path, model: &Path, data: &Path, out: &Path, extra: &str) {
    let text = format!(
        "model = {:?}\ndata = {:?}\nout = {:?}\n{extra}",
        s(model),
        s(data),
        s(out)
    );
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_model_pretrained_on_synth_shards_learns_well_below_the_unigram_entropy() {
    let d = scratch("learn");
    let (model, data) = synth_model(&d);
    let cfg = d.join("run.toml");
    write_config(
        &cfg,
        &model,
        &data,
        &d.join("run"),
        "steps = 200\nseq_len = 64\nmicro_batch = 8\nlr = 3e-3\neval_every = 100\n",
    );
    let (_, err) = fount_ok(&["train", "--config", &s(&cfg)]);
    assert!(err.contains("done: 200 steps"), "{err}");
    assert!(d.join("run/loss.png").exists() && d.join("run/final/model.safetensors").exists());
    let unigram = fount_train::pretrain::unigram_entropy(&data, "train").unwrap_or(0.0);
    let last = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap_or_default();
    let val = last
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["val_loss"].as_f64())
        .unwrap_or(f64::NAN);
    eprintln!("unigram entropy {unigram:.3} nats; validation loss after 200 steps {val:.3}");
    assert!(
        val < 0.5 * unigram,
        "validation loss {val}, unigram entropy {unigram}"
    );
    // the trained model generates
    let (text, _) = fount_ok(&[
        "generate",
        "--model",
        &s(&d.join("run/final")),
        "--prompt",
        "The",
        "--max-tokens",
        "8",
    ]);
    assert!(!text.is_empty());

    // the same model and shards from the artifacts store (`artifacts:KEY` in the config, so a
    // pool job runs on any node) train to the same bytes as from the local directories
    let (store, cache) = (s(&d.join("objects")), s(&d.join("cache")));
    for (path, key) in [(&model, "models/init"), (&data, "shards/synth")] {
        fount_ok(&[
            "artifacts",
            "--artifacts",
            &store,
            "--data-dir",
            &cache,
            "put",
            &s(path),
            key,
        ]);
    }
    let short = "steps = 4\nseq_len = 32\nmicro_batch = 4\n";
    let trained = |name: &str, model: &str, data: &str, store: Option<&str>| {
        let cfg = d.join(format!("{name}.toml"));
        let text = format!(
            "model = {model:?}\ndata = {data:?}\nout = {:?}\n{short}",
            s(&d.join(name))
        );
        std::fs::write(&cfg, text).unwrap_or_else(|e| panic!("{e}"));
        let mut args = vec!["train", "--config", cfg.to_str().unwrap_or_default()];
        args.extend(["--data-dir", &cache, "--no-ledger"]);
        args.extend(store.map(|u| ["--artifacts", u]).iter().flatten());
        crate::util::fount(&args)
    };
    let weights = |name: &str| {
        std::fs::read(d.join(name).join("final/model.safetensors"))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let (m, sh) = (s(&model), s(&data));
    for (name, model, data, store) in [
        ("local", m.as_str(), sh.as_str(), None),
        (
            "stored",
            "artifacts:models/init",
            "artifacts:shards/synth",
            Some(store.as_str()),
        ),
    ] {
        let o = trained(name, model, data, store);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(
        weights("local") == weights("stored"),
        "training from the store changed the model"
    );
    // a run that publishes its final model to the store: it fetches whole, the same bytes
    let cfg = d.join("stored.toml");
    let text = std::fs::read_to_string(&cfg).unwrap_or_default();
    let published = d.join("published.toml");
    std::fs::write(&published, text.replace("stored", "published"))
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, err) = fount_ok(&[
        "train",
        "--config",
        &s(&published),
        "--data-dir",
        &cache,
        "--artifacts",
        &store,
        "--publish",
        "models/trained",
    ]);
    assert!(
        err.contains("published to artifacts:models/trained"),
        "{err}"
    );
    let get = [
        "artifacts",
        "--artifacts",
        &store,
        "--data-dir",
        &cache,
        "get",
        "models/trained",
    ];
    let (got, _) = fount_ok(&get);
    let got = std::fs::read(Path::new(got.trim()).join("model.safetensors"));
    assert!(got.is_ok_and(|w| w == weights("stored")));
    let o = trained(
        "x",
        "artifacts:models/init",
        "artifacts:shards/none",
        Some(&store),
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("fetching data artifacts:shards/none"),
        "{e}"
    );
    let o = trained("x", "artifacts:models/init", &sh, None);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("model artifacts:models/init: give --artifacts"),
        "{e}"
    );
}

/// Starts `fount train`, kills it with SIGKILL after `after`; whether a checkpoint save was cut.
fn kill_after(cfg: &Path, resume: bool, after: Duration, ckpts: &Path) -> bool {
    let mut args = vec!["train".to_string(), "--config".into(), s(cfg)];
    if resume {
        args.push("--resume".into());
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_fount"))
        .env(
            "FOUNT_DATA_DIR",
            concat!(env!("CARGO_TARGET_TMPDIR"), "/fount-data"),
        )
        .args(&args)
        .env("FOUNT_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(after);
    let _ = child.kill();
    let _ = child.wait();
    has_partial(ckpts)
}

/// Whether a checkpoint save was cut: a `.partial` directory under `ckpts`.
fn has_partial(ckpts: &Path) -> bool {
    std::fs::read_dir(ckpts).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.path().extension().is_some_and(|x| x == "partial"))
    })
}

#[test]
fn a_run_killed_at_any_moment_resumes_to_the_same_weights_bit_for_bit() {
    let d = scratch("kill");
    let (model, data) = synth_model(&d);
    let settings = "steps = 40\nseq_len = 32\nmicro_batch = 4\nlr = 3e-3\neval_every = 20\ncheckpoint_every = 1\nkeep_checkpoints = 2\n";
    let straight = d.join("straight.toml");
    write_config(&straight, &model, &data, &d.join("straight"), settings);
    fount_ok(&["train", "--config", &s(&straight)]);

    let killed = d.join("killed.toml");
    let out = d.join("killed");
    write_config(&killed, &model, &data, &out, settings);
    // kill at growing delays until one kill landed inside a checkpoint save and several
    // landed elsewhere; every restart resumes from the newest complete checkpoint
    let (mut kills, mut during_save) = (0, 0);
    let start = Instant::now();
    let mut delay = 400;
    while (kills < 4 || during_save == 0) && start.elapsed() < Duration::from_secs(240) {
        if during_save == 0 && kills >= 4 {
            delay = 150 + (kills * 37) % 200;
        }
        if kill_after(
            &killed,
            kills > 0,
            Duration::from_millis(delay),
            &out.join("checkpoints"),
        ) {
            during_save += 1;
        }
        kills += 1;
        delay += 150;
        let done = out.join("final/model.safetensors").exists();
        if done {
            // finished before the kill: start over so that the kills keep landing mid-run
            assert!(
                during_save > 0 || kills < 30,
                "no kill landed during a save"
            );
            let _ = std::fs::remove_dir_all(&out);
            delay = 300;
        }
    }
    let saved = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    eprintln!(
        "{kills} kills, {during_save} during a save; {} steps done before the last resume",
        saved.lines().count()
    );
    assert!(during_save > 0, "{kills} kills, none during a save");
    // a cut save leaves nothing that loads: resume and finish
    let (_, err) = fount_ok(&["train", "--config", &s(&killed), "--resume"]);
    assert!(err.contains("done: 40 steps"), "{err}");
    let a = std::fs::read(d.join("straight/final/model.safetensors")).unwrap_or_default();
    let b = std::fs::read(out.join("final/model.safetensors")).unwrap_or_default();
    assert!(
        !a.is_empty() && a == b,
        "after {kills} kills ({during_save} during a save) the weights differ"
    );
    let steps: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert_eq!(steps, (1..=40).collect::<Vec<_>>(), "each step logged once");
}

#[test]
fn train_refuses_bad_configs_with_clear_errors() {
    let d = scratch("bad");
    let cfg = d.join("bad.toml");
    std::fs::write(
        &cfg,
        "model = \"m\"\ndata = \"d\"\nout = \"o\"\nsteps = 10\nbatch = 4\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = crate::util::fount_err(&["train", "--config", &s(&cfg)]);
    assert!(
        err.contains("unknown field") && err.contains("batch"),
        "{err}"
    );
    let err = crate::util::fount_err(&["train", "--config", &s(&d.join("missing.toml"))]);
    assert!(err.contains("missing.toml"), "{err}");
    std::fs::write(
        &cfg,
        "model = \"m\"\ndata = \"d\"\nout = \"o\"\nsteps = 0\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let err = crate::util::fount_err(&["train", "--config", &s(&cfg)]);
    assert!(err.contains("steps must be at least 1"), "{err}");
}

/// `mpirun` with the flags a container's root user needs.
#[cfg(feature = "mpi")]
fn mpirun(ranks: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        &ranks.to_string(),
    ])
    .arg(env!("CARGO_BIN_EXE_fount"))
    .args(args)
    .env("FOUNT_THREADS", "1")
    // the finished run is logged to the tests' store, not the source tree
    .env(
        "FOUNT_DATA_DIR",
        concat!(env!("CARGO_TARGET_TMPDIR"), "/fount-data"),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    c
}

#[cfg(feature = "mpi")]
fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

#[cfg(feature = "mpi")]
#[test]
fn two_mpi_ranks_train_as_one_and_resume_exactly_after_a_kill() {
    let d = scratch("mpi");
    let (model, data) = synth_model(&d);
    let common = "steps = 30\nseq_len = 32\nlr = 3e-3\neval_every = 0\ncheckpoint_every = 1\nkeep_checkpoints = 3\n";
    let one = d.join("one.toml");
    write_config(
        &one,
        &model,
        &data,
        &d.join("one"),
        &format!("{common}micro_batch = 8\n"),
    );
    fount_ok(&["train", "--config", &s(&one)]);
    let two_cfg = format!("{common}micro_batch = 4\n");
    let two = d.join("two.toml");
    write_config(&two, &model, &data, &d.join("two"), &two_cfg);
    let out = mpirun(2, &["train", "--config", &s(&two)])
        .output()
        .unwrap_or_else(|e| panic!("mpirun: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 2 ranks × 4 sequences: the loss of 1 rank × 8 at every step
    let (a, b) = (losses(&d.join("one")), losses(&d.join("two")));
    assert_eq!((a.len(), b.len()), (30, 30));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() / x < 1e-5, "step {}: {x} against {y}", i + 1);
    }
    for r in 0..2 {
        assert!(d
            .join(format!("two/checkpoints/step-00000030/rank-{r}.json"))
            .exists());
    }
    // killed with SIGKILL (mpirun and both ranks): once anywhere after a few checkpoints, then
    // inside a checkpoint save (a `.partial` directory on disk); resumed after each
    let killed = d.join("killed.toml");
    let kout = d.join("killed");
    let ckpts = kout.join("checkpoints");
    write_config(&killed, &model, &data, &kout, &two_cfg);
    let partial = || has_partial(&ckpts);
    let newest =
        || fount_train::checkpoint::list(&ckpts).map_or(0, |l| l.last().map_or(0, |c| c.0));
    let mut during_save = false;
    for attempt in 0..8 {
        let mut args = vec!["train", "--config"];
        let cfg = s(&killed);
        args.push(&cfg);
        if attempt > 0 {
            args.push("--resume");
        }
        let mut child = mpirun(2, &args)
            .spawn()
            .unwrap_or_else(|e| panic!("mpirun: {e}"));
        let start = Instant::now();
        let from = newest();
        loop {
            assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
            if attempt == 0 && newest() >= 3 {
                break;
            }
            if attempt > 0 && newest() > from && partial() {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // the ranks (mpirun's children, in process groups of their own), then mpirun
        let _ = Command::new("pkill")
            .args(["-9", "-P", &child.id().to_string()])
            .status();
        let _ = child.kill();
        let _ = child.wait();
        assert!(!kout.join("final").exists(), "killed before the end");
        if attempt > 0 && partial() {
            during_save = true;
            break;
        }
    }
    assert!(during_save, "no kill landed inside a save");
    let out = mpirun(2, &["train", "--config", &s(&killed), "--resume"])
        .output()
        .unwrap_or_else(|e| panic!("mpirun: {e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let x = std::fs::read(d.join("two/final/model.safetensors")).unwrap_or_default();
    let y = std::fs::read(kout.join("final/model.safetensors")).unwrap_or_default();
    assert!(!x.is_empty() && x == y, "resumed 2-rank weights differ");
}
