//! `fount ledger`: the verifier key, checkpoints, entries, verification of artifacts and of the
//! whole log, and a witness. Also where the other commands log their runs from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fount_ledger::note::Verifier;
use fount_ledger::provenance::{read_provenance, record_artifact, verify_artifact};
use fount_ledger::statement::{rfc3339, slsa, Run, PROVENANCE_FILE, SLSA_PROVENANCE};
use fount_ledger::verify::verify_log;
use fount_ledger::witness::Witness;
use fount_ledger::Ledger;
use fount_store::Store;
use serde_json::{json, Value};

/// Where a run is logged: the store (and the ledger key) `fount serve` uses.
#[derive(Debug, Clone, Args)]
pub struct LedgerTarget {
    /// Data directory of the store the run is logged to (and of the ledger's key,
    /// `ledger.key`).
    #[arg(
        long = "data-dir",
        env = "FOUNT_DATA_DIR",
        default_value = "fount-data"
    )]
    pub data_dir: PathBuf,
    /// PostgreSQL URL of that store instead of the SQLite file.
    #[arg(long, env = "FOUNT_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Log nothing: no ledger entry, no provenance.json.
    #[arg(long)]
    pub no_ledger: bool,
}

impl LedgerTarget {
    /// The target of a data directory.
    pub fn at(data_dir: &Path) -> LedgerTarget {
        LedgerTarget {
            data_dir: data_dir.to_path_buf(),
            database_url: None,
            no_ledger: false,
        }
    }
}

/// A runtime for the store's async calls from a command that has none.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The ledger in `data_dir`'s store (or `database_url`'s), its key in `data_dir`.
pub async fn open(data_dir: &Path, database_url: Option<&str>) -> Result<Ledger> {
    let store = Store::open(data_dir, database_url)
        .await
        .context("opening the store (--data-dir / --database-url)")?;
    Ledger::open(store, data_dir).context("the ledger's key")
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    fount_store::now_ms()
}

/// The SLSA run of a command that started at `started_ms` and ends now.
pub fn run_of(
    build_type: &str,
    external: Value,
    inputs: &[PathBuf],
    started_ms: i64,
) -> Result<Run> {
    Ok(Run {
        build_type: format!("https://fount.dev/{build_type}/v1"),
        external,
        internal: json!({
            "threads": rayon::current_num_threads(),
            "host": std::env::var("HOSTNAME").ok(),
        }),
        dependencies: fount_ledger::statement::dependencies(inputs)
            .context("hashing the run's inputs")?,
        invocation_id: std::env::var(fount_pool::executor::JOB_ENV).ok(),
        started_on: rfc3339(started_ms),
        finished_on: rfc3339(now_ms()),
    })
}

/// Logs the artifact directory `dir` made by `run` and writes its `provenance.json`; `only`
/// names the files (or `folder/`s) that are the artifact, all of them when empty.
pub fn record_run(
    target: &LedgerTarget,
    dir: &Path,
    only: &[&str],
    kind: &str,
    run: Run,
) -> Result<()> {
    if target.no_ledger {
        return Ok(());
    }
    let index = runtime()?.block_on(async {
        let ledger = open(&target.data_dir, target.database_url.as_deref()).await?;
        let index = record_artifact(&ledger, dir, only, kind, SLSA_PROVENANCE, slsa(&run))
            .await
            .with_context(|| format!("logging {}", dir.display()))?;
        ledger.store().close().await;
        Ok::<u64, anyhow::Error>(index)
    })?;
    eprintln!(
        "ledger: entry {index}; {}",
        dir.join(PROVENANCE_FILE).display()
    );
    Ok(())
}

/// Logs an administrative act from the command line (`fount_ledger::statement::admin`).
pub async fn log_act(
    store: &Store,
    data_dir: &Path,
    act: &str,
    (subject, details): (String, Value),
) -> Result<()> {
    let ledger = Ledger::open(store.clone(), data_dir).context("the ledger's key")?;
    ledger
        .log_admin(act, &subject, details)
        .await
        .context("logging to the ledger")?;
    Ok(())
}

/// `fount ledger` arguments.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// The store, and the ledger's key (`ledger.key` in the data directory).
    #[command(flatten)]
    pub store: super::admin::StoreArgs,
    #[command(subcommand)]
    pub command: LedgerCommand,
}

/// What to do with the ledger.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Print the log's verifier key (`name+hash+key`), creating the key when there is none.
    Key {
        /// The log's name (its checkpoints' origin line) when the key is created.
        #[arg(long)]
        origin: Option<String>,
    },
    /// Print the latest signed checkpoint.
    Checkpoint,
    /// Print an entry.
    Show {
        /// Its index.
        index: u64,
    },
    /// Verify an artifact directory back to its raw data, or (--log) the whole log.
    Verify {
        /// An artifact directory holding provenance.json.
        path: Option<PathBuf>,
        /// Verify the whole log: every entry, stored hash, checkpoint and bill.
        #[arg(long, conflicts_with = "path")]
        log: bool,
        /// The log's verifier key to trust (default: this data directory's own key).
        #[arg(long)]
        key: Option<String>,
    },
    /// Run a C2SP tlog-witness that cosigns the given logs' checkpoints once they prove
    /// consistent with what it cosigned before.
    Witness {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8790")]
        listen: String,
        /// The witness's key and state.
        #[arg(long)]
        dir: PathBuf,
        /// The witness's name (its key's name) when the key is created.
        #[arg(long)]
        name: Option<String>,
        /// A log to witness: its verifier key (repeat for several).
        #[arg(long = "log", required = true)]
        logs: Vec<String>,
    },
}

/// Runs `fount ledger`.
pub fn run(a: LedgerArgs) -> Result<()> {
    if let LedgerCommand::Witness {
        listen,
        dir,
        name,
        logs,
    } = a.command
    {
        return witness(&listen, &dir, name.as_deref(), &logs);
    }
    if let LedgerCommand::Key { origin: Some(o) } = &a.command {
        let signer = fount_ledger::log::load_or_create_key(
            &fount_ledger::log::key_path(&a.store.data_dir),
            Some(o),
        )?;
        println!("{}", signer.verifier_key());
        return Ok(());
    }
    runtime()?.block_on(async {
        let ledger = open(&a.store.data_dir, a.store.database_url.as_deref()).await?;
        let out = command(&ledger, a.command).await;
        ledger.store().close().await;
        out
    })
}

async fn command(ledger: &Ledger, c: LedgerCommand) -> Result<()> {
    match c {
        LedgerCommand::Key { .. } => println!("{}", ledger.verifier_key()),
        LedgerCommand::Checkpoint => print!("{}", ledger.checkpoint().await?),
        LedgerCommand::Show { index } => {
            let e = ledger.entry(index).await?;
            let st: Value = serde_json::from_str(&e.body)?;
            println!(
                "entry {index} ({}, {})\n{}",
                e.kind,
                rfc3339(e.created_at_ms),
                serde_json::to_string_pretty(&st)?
            );
        }
        LedgerCommand::Verify { path, log, key } => {
            let verifier = match &key {
                Some(k) => Verifier::parse(k).context("--key")?,
                None => ledger.verifier(),
            };
            if log {
                let r = verify_log(ledger, &verifier).await?;
                println!(
                    "ok: {} entries hash to the latest checkpoint; {} checkpoints consistent with it; \
                     {} hourly bills ({} usage records) and {} hours of audit ({} records) unchanged",
                    r.entries,
                    r.checkpoints,
                    r.usage_commits,
                    r.usage_records,
                    r.audit_commits,
                    r.audit_records
                );
                return Ok(());
            }
            let Some(path) = path else {
                bail!("give an artifact directory, or --log for the whole log");
            };
            let report = verify_artifact(&path, &verifier)
                .with_context(|| format!("verifying {}", path.display()))?;
            for l in &report.lines {
                println!("{l}");
            }
            // with the log at hand: every entry on the way is the log's own, and the log still
            // extends the checkpoints the proofs were made against
            if key.is_none() || ledger.verifier() == verifier {
                let now = ledger.open_checkpoint(&ledger.checkpoint().await?)?;
                for (dir, index) in &report.artifacts {
                    check_live(ledger, dir, *index, now.size, &now.root).await?;
                }
                println!(
                    "ok  every entry is in the log at its checkpoint of size {}",
                    now.size
                );
            }
            println!(
                "ok: {} verified back to {} raw input file(s)",
                path.display(),
                report.raw_inputs.len()
            );
        }
        LedgerCommand::Witness { .. } => unreachable!("handled before the store opens"),
    }
    Ok(())
}

async fn check_live(
    ledger: &Ledger,
    dir: &Path,
    index: u64,
    size: u64,
    root: &[u8; 32],
) -> Result<()> {
    let p = read_provenance(dir)?;
    let e = ledger.entry(index).await?;
    use base64::Engine as _;
    if base64::engine::general_purpose::STANDARD.encode(e.body.as_bytes()) != p.leaf {
        bail!(
            "{}: entry {index} in the log is not the one in provenance.json",
            dir.display()
        );
    }
    let proof = fount_ledger::log::parse_tlog_proof(&p.proof)?;
    let then = ledger.open_checkpoint(&proof.checkpoint)?;
    let cons = ledger.consistency_proof(then.size, size).await?;
    fount_ledger::merkle::verify_consistency(then.size, size, &cons, &then.root, root).map_err(|e| {
        anyhow::anyhow!(
            "{}: the log of size {size} does not extend the checkpoint of size {} its proof was made against: {e}",
            dir.display(),
            then.size
        )
    })?;
    Ok(())
}

fn witness(listen: &str, dir: &Path, name: Option<&str>, logs: &[String]) -> Result<()> {
    super::init_tracing();
    let keys = logs
        .iter()
        .map(|k| Verifier::parse(k).with_context(|| format!("--log {k}")))
        .collect::<Result<Vec<_>>>()?;
    let w = Arc::new(Witness::open(dir, name, keys).context("opening the witness")?);
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen}"))?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        println!("{}", w.verifier_key());
        tracing::info!("witness listening on http://{}", listener.local_addr()?);
        axum_serve(listener, fount_server::ledger::witness_router(w)).await
    })
}

async fn axum_serve(
    listener: tokio::net::TcpListener,
    router: fount_server::ledger::Router,
) -> Result<()> {
    fount_server::ledger::serve_router(listener, router)
        .await
        .context("serving")
}
