//! What every handler shares: the engine, the model's tokenizer and chat template, limits,
//! metrics, and whether the server is draining.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::Device;
use fount_engine::fair::{FairQueue, FairShares};
use fount_engine::{Engine, EngineConfig};
use fount_model::{ChatTemplate, Config, Loaded, Tokenizer};

use crate::metrics::ServerMetrics;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name clients pass as `model` for the base model.
    pub model_name: String,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Context length to serve, when shorter than the model's (prompt plus generated tokens).
    pub max_model_len: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_name: "fount".into(),
            max_body_bytes: 4 << 20,
            max_model_len: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The model directory could not be loaded.
    #[error(transparent)]
    Model(#[from] fount_model::Error),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] fount_engine::Error),
    /// An adapters directory could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// An adapter in the adapters directory is unusable.
    #[error("adapter {name:?} in {dir}: {source}")]
    Adapter {
        /// Its folder name.
        name: String,
        /// The adapters directory.
        dir: std::path::PathBuf,
        /// Why.
        source: Box<fount_model::Error>,
    },
}

/// The state behind every route.
#[derive(Debug)]
pub struct AppState {
    pub(crate) engine: Engine,
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: Option<ChatTemplate>,
    pub(crate) config: Config,
    pub(crate) dtype: candle_core::DType,
    pub(crate) cfg: ServerConfig,
    pub(crate) started: u64,
    pub(crate) metrics: ServerMetrics,
    /// When each adapter name was last registered (Unix seconds).
    pub(crate) adapter_times: Mutex<HashMap<String, u64>>,
    draining: AtomicBool,
    in_flight: AtomicUsize,
    tenancy: std::sync::OnceLock<Arc<crate::tenancy::Tenancy>>,
    files: std::sync::OnceLock<crate::files::FilesConfig>,
    fine_tuning: std::sync::OnceLock<crate::finetuning::FineTuningConfig>,
    ledger: std::sync::OnceLock<fount_ledger::Ledger>,
    /// Policies, suspensions and the audit trail.
    pub(crate) safety: Arc<crate::safety::Safety>,
    /// Tenant weights of the engine's fair queue (when the engine runs one).
    shares: FairShares,
    /// What this replica has applied of the store's adapter registry.
    pub(crate) registry: crate::replicas::Registry,
    /// Where adapters, fine-tuned models and files are kept besides local disk.
    pub(crate) artifacts: std::sync::OnceLock<fount_artifacts::Artifacts>,
}

/// A running generation request; see [`AppState::requests_in_flight`].
#[derive(Debug)]
pub(crate) struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AppState {
    /// Loads the model in `dir` (f32 on the CPU), starts the engine over it with a weighted
    /// fair queue by tenant, and registers every PEFT adapter found in a subdirectory of
    /// `adapters` under its folder name.
    pub fn load(
        dir: &Path,
        adapters: Option<&Path>,
        engine_cfg: EngineConfig,
        cfg: ServerConfig,
    ) -> Result<Arc<AppState>, SetupError> {
        let loaded = Loaded::open(dir, None, candle_core::DType::F32)?;
        AppState::load_model(loaded, adapters, engine_cfg, cfg)
    }

    /// [`AppState::load`] over a model already loaded (a directory or a GGUF file, with its
    /// tokenizer, template and stop tokens).
    pub fn load_model(
        loaded: Loaded,
        adapters: Option<&Path>,
        engine_cfg: EngineConfig,
        cfg: ServerConfig,
    ) -> Result<Arc<AppState>, SetupError> {
        let Loaded {
            model,
            tokenizer,
            template,
            generation,
        } = loaded;
        let eos = generation.eos_token_ids;
        let config = model.config().clone();
        let dtype = model.dtype();
        let shares = FairShares::default();
        let fair = Box::new(FairQueue::new(shares.clone()));
        let engine = Engine::start_with(model, tokenizer.clone(), eos, engine_cfg, fair)?;
        let state = AppState::build(engine, tokenizer, template, config, dtype, cfg, shares);
        if let Some(root) = adapters {
            let mut entries: Vec<_> = fs_err::read_dir(root)?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("adapter_config.json").exists())
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name().to_string_lossy().into_owned();
                // refuse unusable adapters at start-up rather than on a tenant's first request
                fount_model::LoraAdapter::load(&e.path(), &state.config, dtype, &Device::Cpu)
                    .map_err(|source| SetupError::Adapter {
                        name: name.clone(),
                        dir: root.to_path_buf(),
                        source: Box::new(source),
                    })?;
                state.register_adapter(&name, e.path());
            }
        }
        Ok(state)
    }

    /// State over a running engine whose admission is the fair queue over `shares`.
    fn build(
        engine: Engine,
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        config: Config,
        dtype: candle_core::DType,
        cfg: ServerConfig,
        shares: FairShares,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            engine,
            tokenizer,
            template,
            config,
            dtype,
            cfg,
            started: now(),
            metrics: ServerMetrics::new(),
            adapter_times: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            tenancy: std::sync::OnceLock::new(),
            files: std::sync::OnceLock::new(),
            fine_tuning: std::sync::OnceLock::new(),
            ledger: std::sync::OnceLock::new(),
            safety: Arc::new(crate::safety::Safety::new()),
            shares,
            registry: crate::replicas::Registry::default(),
            artifacts: std::sync::OnceLock::new(),
        })
    }

    /// Turns on API keys, quotas and metering over `store`, starting the usage writer on the
    /// current runtime (once; later calls return the first tenancy).
    pub fn enable_tenancy(&self, store: fount_store::Store) -> Arc<crate::tenancy::Tenancy> {
        self.tenancy
            .get_or_init(|| {
                let tenancy = crate::tenancy::Tenancy::start(store, self.shares.clone());
                tenancy.on_record(self.metrics.billing());
                tenancy
            })
            .clone()
    }

    /// Turns on tenants' policies, the operator's suspensions and the audit trail over the
    /// tenancy's store (after [`AppState::enable_tenancy`]; once).
    pub async fn enable_safety(&self) -> Result<(), fount_store::Error> {
        match self.tenancy() {
            Some(t) => self.safety.start(t.store().clone()).await,
            None => Ok(()),
        }
    }

    /// Safety: the operator's rules, policies, suspensions.
    pub fn safety(&self) -> &Arc<crate::safety::Safety> {
        &self.safety
    }

    /// Keeps tenants' files (OpenAI's Files API) in `cfg.dir` (once; later calls keep the first).
    pub fn enable_files(&self, cfg: crate::files::FilesConfig) {
        let _ = self.files.set(cfg);
    }

    /// Where files are kept, when the Files API is on.
    pub fn files(&self) -> Option<&crate::files::FilesConfig> {
        self.files.get()
    }

    /// Turns on OpenAI's Fine-tuning API (once; later calls keep the first). It needs tenancy
    /// and files; [`crate::finetuning::follow::run`] moves the jobs along.
    pub fn enable_fine_tuning(&self, cfg: crate::finetuning::FineTuningConfig) {
        let _ = self.fine_tuning.set(cfg);
    }

    /// How fine-tuning jobs run, when the API is on.
    pub fn fine_tuning(&self) -> Option<&crate::finetuning::FineTuningConfig> {
        self.fine_tuning.get()
    }

    /// Keeps the ledger: what this server serves, admin acts and bills are logged to it, and it
    /// is served at `/ledger/…`.
    pub fn enable_ledger(&self, ledger: fount_ledger::Ledger) {
        let _ = self.ledger.set(ledger);
    }

    /// The ledger, when kept.
    pub fn ledger(&self) -> Option<&fount_ledger::Ledger> {
        self.ledger.get()
    }

    /// The tenancy layer, when on.
    pub fn tenancy(&self) -> Option<&Arc<crate::tenancy::Tenancy>> {
        self.tenancy.get()
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Registers (or replaces) adapter `name` from `dir`.
    pub fn register_adapter(&self, name: &str, dir: std::path::PathBuf) -> u64 {
        let v = self.engine.adapters().register(name, dir);
        if let Ok(mut t) = self.adapter_times.lock() {
            t.insert(name.to_string(), now());
        }
        v
    }

    /// Stops taking requests: routes answer 503 from now on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`AppState::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The context length served, in tokens: the model's, or `max_model_len` when shorter.
    pub fn context(&self) -> usize {
        let model = self.config.max_position_embeddings;
        self.cfg.max_model_len.map_or(model, |m| m.min(model))
    }

    /// Marks a generation request as running until the guard is dropped (for draining).
    pub(crate) fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Generation requests running now (streams included).
    pub fn requests_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}
