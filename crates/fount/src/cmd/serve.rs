//! `fount serve`: the OpenAI-compatible HTTP server over one base model and its adapters.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use fount_engine::EngineConfig;
use fount_server::{AppState, ServerConfig};

/// Arguments of `fount serve`; every flag can also come from the environment.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Hugging Face model directory, or GGUF file (`.gguf`), to serve.
    #[arg(long, env = "FOUNT_MODEL")]
    pub model: PathBuf,
    /// A `tokenizer.json` (or a directory with one and its chat template) to use instead of
    /// the model's own.
    #[arg(long, env = "FOUNT_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// The name clients pass as `model` (default: the directory's name).
    #[arg(long, env = "FOUNT_MODEL_NAME")]
    pub model_name: Option<String>,
    /// A directory with one PEFT adapter per subdirectory, each served under its folder name.
    #[arg(long, env = "FOUNT_ADAPTERS")]
    pub adapters: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "FOUNT_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, env = "FOUNT_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Memory for the KV cache (e.g. 512MiB, 2GiB).
    #[arg(long, env = "FOUNT_KV_MEMORY", default_value = "1GiB")]
    pub kv_memory: String,
    /// Requests waiting for the engine before new ones get 429.
    #[arg(long, env = "FOUNT_MAX_QUEUE", default_value_t = 256)]
    pub max_queue: usize,
    /// Sequences decoding at once.
    #[arg(long, env = "FOUNT_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Memory for loaded adapters (least recently used first out).
    #[arg(long, env = "FOUNT_ADAPTER_MEMORY", default_value = "1GiB")]
    pub adapter_memory: String,
    /// Serve a context shorter than the model's (prompt plus generated tokens).
    #[arg(long, env = "FOUNT_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Largest request body.
    #[arg(long, env = "FOUNT_MAX_BODY", default_value = "4MiB")]
    pub max_body: String,
    /// Largest file a tenant may upload (`POST /v1/files`).
    #[arg(long, env = "FOUNT_MAX_FILE", default_value = "512MiB")]
    pub max_file: String,
    /// Data directory: tenants, keys, quotas and usage (`fount.db`, SQLite) unless
    /// --database-url is given.
    #[arg(long, env = "FOUNT_DATA_DIR", default_value = "fount-data")]
    pub data_dir: PathBuf,
    /// PostgreSQL URL (`postgres://user@host/db`) for tenants, keys, quotas and usage. Every
    /// replica on the same database shares quotas, adapters, keys and suspensions.
    #[arg(long, env = "FOUNT_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Object storage for adapters, fine-tuned models and tenants' files (`s3://bucket/prefix`
    /// with the `AWS_*` environment, or a directory); fetched files are cached in
    /// `--data-dir`/cache, checked by digest. With it, `--model artifacts:KEY` serves a model
    /// stored there (`fount artifacts put`).
    #[arg(long, env = "FOUNT_ARTIFACTS")]
    pub artifacts: Option<String>,
    /// Serve without API keys, quotas or metering (a single user on a trusted machine).
    #[arg(long, env = "FOUNT_NO_AUTH")]
    pub no_auth: bool,
    /// Do not run the compute pool in this process (run `fount pool run` elsewhere on the same
    /// store, or no pool at all).
    #[arg(long, env = "FOUNT_NO_POOL")]
    pub no_pool: bool,
    /// Take fine-tuning requests and serve the models they make, but leave checking a job's
    /// files and following its run to the replicas without this flag: with it, this replica
    /// never reads the fine-tuning work directory, so it need not share it with the pool.
    #[arg(long, env = "FOUNT_NO_FINE_TUNING_WORK")]
    pub no_fine_tuning_work: bool,
    #[command(flatten)]
    pub pool: super::pool::PoolArgs,
    /// A witness to take the ledger's checkpoints to, `URL=VERIFIER_KEY` (repeat for several);
    /// the checkpoint served carries their cosignatures.
    #[arg(long = "witness", env = "FOUNT_WITNESSES", value_delimiter = ',')]
    pub witnesses: Vec<String>,
    /// How often (seconds) the ledger's background work runs: committing finished hours of
    /// usage and taking new checkpoints to the witnesses.
    #[arg(long, default_value_t = 60)]
    pub ledger_every: u64,
    /// The operator's moderation rules (a TOML file of `[[rules]]`; docs/safety.md), instead of
    /// fount's default list.
    #[arg(long, env = "FOUNT_SAFETY_RULES")]
    pub safety_rules: Option<PathBuf>,
}

/// Makes an admin key when the store has no usable one, and prints it once (to stderr, never
/// to the log).
async fn bootstrap_admin(store: &fount_store::Store, ledger_dir: Option<&Path>) -> Result<()> {
    use fount_store::Scope;
    let now = fount_store::now_ms() / 1000;
    let usable = store.keys(None).await?.into_iter().any(|k| {
        k.scopes.contains(&Scope::Admin)
            && k.revoked_at.is_none()
            && k.expires_at.is_none_or(|e| e > now)
    });
    if usable {
        return Ok(());
    }
    let tenant = match store.tenant_by_name("admin").await? {
        Some(t) => t,
        None => {
            let t = store.create_tenant("admin").await?;
            if let Some(dir) = ledger_dir {
                let what = fount_ledger::statement::tenant_created(&t);
                super::ledger::log_act(store, dir, "tenant.create", what).await?;
            }
            t
        }
    };
    let (key, info) = store
        .create_key(
            &tenant.id,
            "bootstrap",
            &[Scope::Admin, Scope::Inference],
            None,
        )
        .await?;
    if let Some(dir) = ledger_dir {
        let what = fount_ledger::statement::key_created(&info);
        super::ledger::log_act(store, dir, "key.create", what).await?;
    }
    eprintln!("admin API key (shown once; store it now): {}", key.expose());
    Ok(())
}

/// Parses `512MiB`, `2GiB`, `1G`, `100k` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a size such as 512MiB or 2GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown size unit {other:?} in {s:?} (B, KiB, MiB, GiB, k, M, G)"),
    };
    Ok((n * mult) as usize)
}

/// Runs `fount serve` until SIGTERM or Ctrl-C, then drains and returns.
pub fn run(a: ServeArgs) -> Result<()> {
    run_with(a, |_| {})
}

/// [`run`], calling `on_listen` with the bound address once the server accepts connections.
pub fn run_with(a: ServeArgs, on_listen: impl FnOnce(SocketAddr)) -> Result<()> {
    super::init_tracing();
    let stored_name = a
        .model
        .to_str()
        .and_then(|m| m.strip_prefix("artifacts:"))
        .and_then(|k| k.trim_end_matches('/').rsplit('/').next())
        .map(str::to_string);
    let model_name = match a.model_name.as_ref().or(stored_name.as_ref()) {
        Some(n) => n.clone(),
        None => a
            .model
            .canonicalize()
            .ok()
            .and_then(|p| {
                // a directory's name, or a GGUF file's without `.gguf`
                let name = if fount_model::is_gguf(&p) {
                    p.file_stem()
                } else {
                    p.file_name()
                };
                name.map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "fount".into()),
    };
    let engine_cfg = EngineConfig {
        kv_bytes: parse_size(&a.kv_memory).context("--kv-memory")?,
        max_waiting: a.max_queue,
        max_running: a.max_running,
        adapter_cache_bytes: parse_size(&a.adapter_memory).context("--adapter-memory")?,
        ..EngineConfig::default()
    };
    let cfg = ServerConfig {
        model_name: model_name.clone(),
        max_body_bytes: parse_size(&a.max_body).context("--max-body")?,
        max_model_len: a.max_model_len,
    };
    let artifacts = a
        .artifacts
        .as_deref()
        .map(|url| fount_artifacts::Artifacts::open(url, a.data_dir.join("cache")))
        .transpose()
        .context("--artifacts")?;
    let model_dir = super::artifacts::local_model(&a.model, artifacts.as_ref())?;
    let loaded =
        fount_model::Loaded::open(&model_dir, a.tokenizer.as_deref(), candle_core::DType::F32)
            .with_context(|| format!("loading {}", a.model.display()))?;
    let state = AppState::load_model(loaded, a.adapters.as_deref(), engine_cfg, cfg)
        .with_context(|| format!("loading {}", a.model.display()))?;
    if let Some(path) = &a.safety_rules {
        let text = fs_err::read_to_string(path).context("--safety-rules")?;
        let rules = fount_safety::rules::RuleFile::parse(&text)
            .and_then(|f| fount_safety::Rules::compile(&f.rules))
            .with_context(|| format!("--safety-rules {}", path.display()))?;
        state.safety().set_rules(rules);
    }
    let max_file = parse_size(&a.max_file).context("--max-file")?;
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .with_context(|| format!("--host {} --port {} is not an address", a.host, a.port))?;
    let pool = if a.no_pool {
        None
    } else {
        let store = super::admin::StoreArgs {
            data_dir: a.data_dir.clone(),
            database_url: a.database_url.clone(),
        };
        Some(super::pool::PoolThread::spawn(&store, &a.pool).context("starting the compute pool")?)
    };
    let witnesses = a
        .witnesses
        .iter()
        .map(|w| {
            let (url, key) = w
                .split_once('=')
                .with_context(|| format!("--witness {w:?}: give URL=VERIFIER_KEY"))?;
            Ok(fount_server::ledger::WitnessConfig {
                url: url.to_string(),
                key: fount_ledger::note::Verifier::parse(key)
                    .with_context(|| format!("--witness {w:?}"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fount-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let tenancy = if a.no_auth {
            tracing::warn!("--no-auth: no API keys, quotas or usage records");
            None
        } else {
            let store = fount_store::Store::open(&a.data_dir, a.database_url.as_deref())
                .await
                .context("opening the store (--data-dir / --database-url)")?;
            fs_err::create_dir_all(&a.data_dir).context("--data-dir")?;
            let ledger = fount_ledger::Ledger::open(store.clone(), &a.data_dir)
                .context("the ledger's key (--data-dir)")?;
            bootstrap_admin(&store, Some(&a.data_dir)).await?;
            state.enable_ledger(ledger.clone());
            state.enable_files(fount_server::files::FilesConfig {
                dir: a.data_dir.join("files"),
                max_bytes: max_file,
            });
            let tenancy = state.enable_tenancy(store);
            if let Some(art) = artifacts {
                state.enable_artifacts(art);
            }
            // adapters registered on any replica, and on PostgreSQL shared quotas
            let bound = listener.local_addr()?;
            state
                .enable_replicas(&bound.to_string())
                .await
                .context("joining the replicas on this store")?;
            state
                .enable_safety()
                .await
                .context("reading safety policies and suspensions")?;
            // fine-tuning jobs run on the pool: this process's (or `fount pool run`'s, with
            // --no-pool), which reads the paths of their commands as written here
            // (with --database-url nothing else has created it yet)
            fs_err::create_dir_all(&a.data_dir).context("--data-dir")?;
            let data_dir = a.data_dir.canonicalize().context("--data-dir")?;
            let base_dir = model_dir.canonicalize().context("--model")?;
            state.enable_fine_tuning(fount_server::finetuning::FineTuningConfig {
                dir: data_dir.join("fine_tuning"),
                base_dir,
                priority: fount_store::Priority::Normal,
                every: std::time::Duration::from_millis(100),
                work: !a.no_fine_tuning_work,
            });
            tokio::spawn(fount_server::finetuning::follow::run(state.clone()));
            let index = fount_server::ledger::log_deployment(&state, &model_dir)
                .await
                .context("logging the deployment to the ledger")?;
            tracing::info!(index, key = %ledger.verifier_key(), "ledger: deployment logged");
            tokio::spawn(fount_server::ledger::run(
                state.clone(),
                witnesses,
                std::time::Duration::from_secs(a.ledger_every.max(1)),
            ));
            Some(tenancy)
        };
        let bound = listener.local_addr()?;
        let adapters = state.engine().adapters().list().len();
        tracing::info!(
            model = %model_name,
            adapters,
            kv_blocks = state.engine().kv_blocks(),
            "listening on http://{bound}"
        );
        on_listen(bound);
        fount_server::serve(listener, state.clone(), shutdown_signal())
            .await
            .context("serving")?;
        if let Some(t) = tenancy {
            // abandoned requests' records may still be on their way
            t.flush().await;
            // the bill so far: every record stored is committed before the store closes
            fount_server::ledger::commit_all_usage(&state).await;
            state.leave_replicas().await;
            t.store().close().await;
        }
        tracing::info!("drained; exiting");
        Ok::<(), anyhow::Error>(())
    })?;
    if let Some(p) = pool {
        // running jobs keep running: the next pool adopts them
        p.stop()?;
    }
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM ({e}); Ctrl-C still stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB").ok(), Some(512 << 20));
        assert_eq!(parse_size("2GiB").ok(), Some(2 << 30));
        assert_eq!(parse_size("1.5G").ok(), Some(1_500_000_000));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }
}
