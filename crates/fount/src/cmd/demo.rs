//! `fount demo`: the whole platform on one machine with one command. A synthetic corpus is
//! curated into token shards, a small model is pretrained on them, a LoRA adapter is fine-tuned on
//! a task, and both are served as a metered, OpenAI-compatible utility.
//!
//! Everything lives in one directory. Each step leaves a finished artefact that the next run
//! reuses; an interrupted step resumes from its checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fount_data::manifest::Manifest;
use fount_data::synth::{synth_corpus, SynthOptions};
use fount_model::init::{init_model, InitOptions, Shape};
use fount_model::publish::Staged;
use fount_model::Arch;
use fount_store::{ApiKey, Scope, Store};
use fount_train::finetune::{chat_accuracy, FinetuneConfig};
use fount_train::TrainConfig;
use serde_json::json;

/// The base model's name in the API.
const BASE_NAME: &str = "fount-demo";
/// The adapter's name in the API.
const ADAPTER_NAME: &str = "dates";
/// The demo tenant.
const TENANT: &str = "demo";

/// Arguments of `fount demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The directory everything is kept in; running again reuses the finished steps.
    #[arg(long, default_value = "fount-demo")]
    pub dir: PathBuf,
    /// `standard`: a ~0.9M-parameter model, about two and a half minutes on two cores.
    /// `small`: the same training, evaluated on 50 held-out prompts instead of 100 (the tests'
    /// size).
    #[arg(long, value_enum, default_value_t = Size::Standard)]
    pub size: Size,
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to serve on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Stop once the adapter is evaluated instead of serving.
    #[arg(long)]
    pub no_serve: bool,
}

/// How big a demo to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Size {
    /// The README's demo.
    Standard,
    /// The tests' size: shorter evaluation. (Smaller models and shorter runs do not learn the
    /// task: digits are single tokens, and copying them into a new order takes this model and
    /// this much training.)
    Small,
}

/// Documents the corpus starts with.
const DOCS: usize = 4000;
/// Vocabulary of the trained tokenizer.
const VOCAB: usize = 1024;
/// The pretraining settings (besides the paths).
const PRETRAIN: &str = "steps = 500\nseq_len = 64\nmicro_batch = 8\nlr = 3e-3\n\
                        eval_every = 100\ncheckpoint_every = 100\n";
/// The fine-tuning settings.
const FINETUNE: &str = "r = 16\nlora_alpha = 32\ntarget_modules = \"all-linear\"\nlr = 1.5e-3\n\
                        epochs = 16\ntokens_per_step = 1024\ncheckpoint_every = 100\n";

/// The model: ~0.9M parameters. The 2-layer, 64-wide tiny preset does not learn to copy digits
/// into a new order (74 % of answer tokens right at best); this does (100 %).
fn shape() -> Result<Shape> {
    Ok(Shape {
        name: "demo",
        hidden_size: 128,
        intermediate_size: 384,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 512,
        tie_word_embeddings: true,
        ..fount_model::init::preset(Arch::Qwen2, "tiny")?
    })
}

impl Size {
    /// Held-out prompts the task accuracy is measured on: all that differs between the sizes.
    fn eval_prompts(self) -> usize {
        match self {
            Size::Standard => 100,
            Size::Small => 50,
        }
    }
}

fn header(n: usize, title: &str, what: &str) {
    println!(
        "\n[{n}/4] {title}\n      {}",
        what.replace('\n', "\n      ")
    );
}

/// Whether a step's artefact `what` is finished (its `marker` exists); says so when it is.
fn done_already(marker: &Path, what: &Path) -> bool {
    let done = marker.exists();
    if done {
        println!("      done already: {}", what.display());
    }
    done
}

/// Writes `text` to `path` unless it already holds exactly that; a different file is an error
/// (the directory was made by another size or version of the demo).
fn write_config(path: &Path, text: &str) -> Result<()> {
    match fs_err::read_to_string(path) {
        Ok(old) if old == text => Ok(()),
        Ok(_) => bail!(
            "{} differs from this demo's settings (another --size?); use another --dir",
            path.display()
        ),
        Err(_) => Ok(fs_err::write(path, text)?),
    }
}

/// Runs `fount demo`: four steps, each leaving a finished artefact that a later run reuses.
pub fn run(a: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let dir = &a.dir;
    fs_err::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let size_file = dir.join("size");
    write_config(&size_file, &format!("{:?}\n", a.size))?;
    let stop = Arc::new(AtomicBool::new(false));
    let signals = super::train::stop_on_signals(stop.clone())?;
    println!(
        "fount demo in {} (stop with Ctrl-C at any point; run it again to continue)",
        dir.display()
    );
    let (synth, data) = step_data(dir)?;
    let Some(base) = step_pretrain(dir, &data, &stop)? else {
        return Ok(());
    };
    let Some(adapters) = step_finetune(dir, &a, &synth, &base, &stop, started)? else {
        return Ok(());
    };
    if a.no_serve || stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    // from here on Ctrl-C belongs to the server: it drains and exits
    signals.store(false, Ordering::SeqCst);
    step_serve(dir, &a, base, adapters)
}

/// Step 1: the synthetic corpus, curated into token shards; returns the synthetic data's and
/// the curated data's directories.
fn step_data(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    header(
        1,
        "data: a corpus curated into token shards",
        "A synthetic web corpus (English and Chinese, with planted duplicates, boilerplate, junk\n\
         and personal data) goes through FineWeb-style filters, MinHash dedup and PII scrubbing;\n\
         a BPE tokenizer is trained on what is kept and the text is written as token shards.",
    );
    let synth = dir.join("synth");
    let synth_done = synth.join("DONE");
    if !done_already(&synth_done, &synth) {
        let opts = SynthOptions {
            docs: DOCS,
            seed: 1,
            ..SynthOptions::default()
        };
        synth_corpus(&synth, &opts).with_context(|| format!("writing {}", synth.display()))?;
        fs_err::write(&synth_done, b"done\n")?;
    }
    let data = dir.join("data");
    let manifest_path = data.join("manifest.json");
    if !done_already(&manifest_path, &data) {
        super::data::run(super::data::DataCommand::Run(super::data::RunArgs {
            input: vec![synth.join("corpus")],
            out: data.clone(),
            pipeline: None,
            tokenizer: None,
            vocab_size: Some(VOCAB),
            text_field: None,
            skip_bad_records: false,
            max_files: None,
            ledger: super::ledger::LedgerTarget::at(&dir.join("store")),
        }))?;
    }
    print_manifest(&manifest_path)?;

    Ok((synth, data))
}

/// Step 2: a model initialised for the curated tokenizer and pretrained on the shards; returns
/// the final model, or `None` when the run was stopped (it resumes next time).
fn step_pretrain(dir: &Path, data: &Path, stop: &Arc<AtomicBool>) -> Result<Option<PathBuf>> {
    header(
        2,
        "pretrain: a small Qwen2-style model learns the corpus",
        "A model that speaks the new tokenizer is initialised and trained with AdamW, warmup and\n\
         cosine decay; checkpoints are written as it goes and the loss curve is drawn at the end.",
    );
    let init = dir.join("init");
    if !done_already(&init.join("DONE"), &init) {
        let staged = Staged::begin(&init)?;
        let opts = InitOptions {
            tokenizer: Some(data.join("tokenizer.json")),
            ..InitOptions::default()
        };
        init_model(Arch::Qwen2, &shape()?, &opts, staged.path())
            .with_context(|| format!("initialising {}", staged.path().display()))?;
        if init.exists() {
            fs_err::remove_dir_all(&init)?;
        }
        staged.commit(Some("DONE"))?;
    }
    let run_dir = dir.join("pretrain");
    let base = run_dir.join("final");
    if !done_already(&base.join("model.safetensors"), &base) {
        let cfg_path = dir.join("pretrain.toml");
        let text = format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\n{}",
            init.to_string_lossy(),
            data.join("shards").to_string_lossy(),
            run_dir.to_string_lossy(),
            PRETRAIN
        );
        write_config(&cfg_path, &text)?;
        let cfg = TrainConfig::from_file(&cfg_path)?;
        let params = fount_train::Params::load(&init).map(|(_, p)| p.count());
        if let Ok(n) = params {
            println!("      {n} parameters, {} steps", cfg.steps);
        }
        // resuming with no checkpoint starts afresh, so every start can ask to resume
        let ledger = super::ledger::LedgerTarget::at(&dir.join("store"));
        if super::train::pretrain(&cfg, true, stop, "fount demo", Some(&ledger))?.is_none() {
            return Ok(None);
        }
    }

    Ok(Some(base))
}

/// Step 3: the adapter fine-tuned on the chat task and measured against the base on held-out
/// prompts; returns the adapters' directory, or `None` when the run was stopped.
fn step_finetune(
    dir: &Path,
    a: &DemoArgs,
    synth: &Path,
    base: &Path,
    stop: &Arc<AtomicBool>,
    started: Instant,
) -> Result<Option<PathBuf>> {
    header(
        3,
        "fine-tune: a LoRA adapter learns a task the base model cannot do",
        "The task: rewrite a date YYYY-MM-DD as DD/MM/YYYY (1,000 chat examples, 100 held out).\n\
         The base stays frozen; a rank-16 adapter on every projection learns the answers.",
    );
    let adapters = dir.join("adapters");
    let adapter = adapters.join(ADAPTER_NAME);
    let chat_train = synth.join("chat/train.jsonl");
    let chat_test = synth.join("chat/test.jsonl");
    if !done_already(&adapter.join("adapter_config.json"), &adapter) {
        let cfg_path = dir.join("finetune.toml");
        write_config(&cfg_path, FINETUNE)?;
        let cfg = FinetuneConfig::from_file(&cfg_path)?;
        let started_ms = super::ledger::now_ms();
        let outcome =
            super::finetune::fine_tune(base, &chat_train, &adapter, &cfg, true, stop, None)?;
        if outcome.interrupted {
            return Ok(None);
        }
        let ledger = super::ledger::LedgerTarget::at(&dir.join("store"));
        super::finetune::record_adapter(
            &ledger,
            base,
            &chat_train,
            &outcome.adapter,
            &cfg,
            started_ms,
        )?;
    }
    let eval_path = dir.join("eval.json");
    let eval: serde_json::Value = match fs_err::read(&eval_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is corrupt; delete it", eval_path.display()))?,
        Err(_) => {
            let n = a.size.eval_prompts();
            let (base_ok, total) = chat_accuracy(base, None, &chat_test, n)?;
            let (adapter_ok, _) = chat_accuracy(base, Some(&adapter), &chat_test, n)?;
            let v =
                json!({"prompts": total, "base_correct": base_ok, "adapter_correct": adapter_ok});
            fs_err::write(&eval_path, serde_json::to_vec_pretty(&v)?)?;
            v
        }
    };
    let total = eval["prompts"].as_u64().unwrap_or(0).max(1);
    let pct = |k: &str| 100.0 * eval[k].as_u64().unwrap_or(0) as f64 / total as f64;
    println!(
        "      held-out task accuracy (exact answers to {total} prompts never trained on):\n      \
         base model {:.0}%, with the adapter {:.0}%",
        pct("base_correct"),
        pct("adapter_correct")
    );
    println!(
        "      ready in {:.0}s; loss curve {}",
        started.elapsed().as_secs_f64(),
        dir.join("pretrain/loss.png").display()
    );
    Ok(Some(adapters))
}

/// Step 4: the base and the adapter served, metered, until Ctrl-C.
fn step_serve(dir: &Path, a: &DemoArgs, base: PathBuf, adapters: PathBuf) -> Result<()> {
    header(
        4,
        "serve: the base and the adapter as a metered, OpenAI-compatible API",
        "One engine serves both (continuous batching; the adapter is applied per request). Every\n\
         request is authenticated, rate-limited and metered into the embedded SQLite store.",
    );
    let store_dir = dir.join("store");
    let key = demo_key(&store_dir, &dir.join("demo-key"))?;
    let args = super::serve::ServeArgs {
        model: base,
        tokenizer: None,
        model_name: Some(BASE_NAME.into()),
        adapters: Some(adapters),
        host: a.host.clone(),
        port: a.port,
        kv_memory: "256MiB".into(),
        max_queue: 256,
        max_running: 64,
        adapter_memory: "64MiB".into(),
        max_model_len: None,
        max_body: "4MiB".into(),
        max_file: "512MiB".into(),
        data_dir: store_dir,
        database_url: None,
        artifacts: None,
        no_auth: false,
        no_fine_tuning_work: false,
        no_pool: false,
        pool: super::pool::PoolArgs::default(),
        witnesses: Vec::new(),
        ledger_every: 60,
        safety_rules: None,
    };
    let train = dir.join("synth/chat/train.jsonl");
    super::serve::run_with(args, |addr| {
        print_examples(&format!("http://{addr}"), key.expose(), &train, dir);
    })
}

/// Documents in and out, and the drops by reason.
fn print_manifest(path: &Path) -> Result<()> {
    let m: Manifest = serde_json::from_slice(&fs_err::read(path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    let docs_in: u64 = m.inputs.iter().map(|i| i.records).sum();
    let kept: u64 = m.kept_by_language.values().sum();
    let mut reasons = std::collections::BTreeMap::<&str, u64>::new();
    for by_reason in m.drops_by_language.values() {
        for (reason, n) in by_reason {
            *reasons.entry(reason).or_default() += n;
        }
    }
    let mut reasons: Vec<_> = reasons.into_iter().collect();
    reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    const SHOWN: usize = 6;
    let mut by_reason: Vec<String> = reasons
        .iter()
        .take(SHOWN)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    if reasons.len() > SHOWN {
        by_reason.push(format!("{} more reasons", reasons.len() - SHOWN));
    }
    println!(
        "      {docs_in} documents in, {kept} kept, {} dropped: {}",
        docs_in.saturating_sub(kept),
        by_reason.join(", ")
    );
    println!(
        "      {} training tokens; manifest {}",
        m.tokens.train_tokens,
        path.display()
    );
    Ok(())
}

/// The demo tenant's inference key: the one kept in `key_file` while the store still accepts
/// it, else a new one (written there, readable by the owner only).
fn demo_key(store_dir: &Path, key_file: &Path) -> Result<ApiKey> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = Store::open(store_dir, None)
            .await
            .with_context(|| format!("opening the store in {}", store_dir.display()))?;
        if let Ok(text) = fs_err::read_to_string(key_file) {
            let key = ApiKey::from_secret(text.trim());
            // a key of an earlier demo without the fine-tuning scopes is replaced
            if let Some((info, _)) = store.authenticate(&key).await? {
                if info.scopes.contains(&Scope::FineTuning) {
                    store.close().await;
                    return Ok(key);
                }
            }
        }
        let tenant = match store.tenant_by_name(TENANT).await? {
            Some(t) => t,
            None => {
                let t = store.create_tenant(TENANT).await?;
                let what = fount_ledger::statement::tenant_created(&t);
                super::ledger::log_act(&store, store_dir, "tenant.create", what).await?;
                t
            }
        };
        let (key, info) = store
            .create_key(
                &tenant.id,
                "demo",
                &[Scope::Inference, Scope::Files, Scope::FineTuning],
                None,
            )
            .await?;
        let what = fount_ledger::statement::key_created(&info);
        super::ledger::log_act(&store, store_dir, "key.create", what).await?;
        store.close().await;
        write_secret(key_file, key.expose())?;
        Ok(key)
    })
}

fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    use std::io::Write;
    let mut f = fs_err::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{secret}")?;
    Ok(())
}

fn print_examples(url: &str, key: &str, train: &Path, dir: &Path) {
    let train = train.display();
    let store = dir.join("store");
    let store = store.display();
    let adapter = dir.join("adapters").join(ADAPTER_NAME);
    let adapter = adapter.display();
    use std::io::Write;
    let prompt = fount_data::synth::chat_prompt("2024-03-15");
    println!(
        r#"
Serving {BASE_NAME} and its adapter {ADAPTER_NAME} on {url} until Ctrl-C.
The demo tenant's key: {key}

for model in {BASE_NAME} {ADAPTER_NAME}; do
  curl {url}/v1/chat/completions -H "Authorization: Bearer {key}" \
    -H "Content-Type: application/json" \
    -d '{{"model": "'$model'", "temperature": 0, "max_tokens": 16, "messages": [{{"role": "user", "content": "{prompt}"}}]}}'
  echo
done

python3 -c '
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="{key}")
for model in ["{BASE_NAME}", "{ADAPTER_NAME}"]:
    r = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
        messages=[{{"role": "user", "content": "{prompt}"}}])
    print(model, "->", r.choices[0].message.content, r.usage.total_tokens, "tokens")
'

# fine-tune your own model on the demo's chat examples, then call it (docs/finetuning.md):
python3 -c '
import time
from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="{key}")
f = client.files.create(file=open("{train}", "rb"), purpose="fine-tune")
job = client.fine_tuning.jobs.create(model="{BASE_NAME}", training_file=f.id, suffix="mine",
                                     hyperparameters={{"n_epochs": 1, "batch_size": 32}})
while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
    time.sleep(2)
print(job.status, job.fine_tuned_model, job.trained_tokens, "trained tokens")
print([e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=5)])
r = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=16, temperature=0,
    messages=[{{"role": "user", "content": "{prompt}"}}])
print(job.fine_tuned_model, "->", r.choices[0].message.content)
'

# where the adapter came from, checked back to the raw corpus (docs/ledger.md); the log's
# signed checkpoint, and the key anyone checks it with:
fount ledger --data-dir {store} verify {adapter}
curl {url}/ledger/checkpoint; fount ledger --data-dir {store} key

curl {url}/v1/usage -H "Authorization: Bearer {key}"    # what the tenant was metered
"#
    );
    let _ = std::io::stdout().flush();
}
