//! The adapter store: named, versioned LoRA adapters, loaded on first use by a background
//! thread and kept in a least-recently-used cache under a memory cap.
//!
//! A request names an adapter; the engine pins the version current at submission, and the
//! sequence holds the loaded weights (`Arc`) until it finishes. Registering a new version of a
//! name therefore never changes a stream already running, and evicting an adapter from the cache
//! frees its memory only once no running sequence uses it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use fount_model::{Config, LoraAdapter};

/// Where an adapter version stands.
#[derive(Debug, Clone)]
pub enum AdapterState {
    /// Loaded and ready.
    Ready(Arc<LoraAdapter>),
    /// Being loaded (or queued for the loader).
    Loading,
    /// Loading failed; the message says why.
    Failed(String),
    /// No such name or version.
    Unknown,
}

#[derive(Debug, Default)]
struct Inner {
    registry: HashMap<String, (u64, PathBuf)>,
    paths: HashMap<(String, u64), PathBuf>,
    loaded: HashMap<(String, u64), (Arc<LoraAdapter>, u64)>,
    loading: HashSet<(String, u64)>,
    failed: HashMap<(String, u64), String>,
    bytes: usize,
    tick: u64,
    next_version: u64,
    load_times: Vec<Duration>,
}

/// Named, versioned adapters with a background loader.
#[derive(Debug)]
pub struct AdapterStore {
    inner: Arc<Mutex<Inner>>,
    loader: Sender<(String, u64, PathBuf)>,
    cap_bytes: usize,
}

impl AdapterStore {
    /// A store for adapters of a model of `cfg`, holding at most `cap_bytes` of loaded adapters
    /// (least recently used first out).
    pub fn new(cfg: Config, dtype: DType, device: Device, cap_bytes: usize) -> AdapterStore {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let (tx, rx) = channel::<(String, u64, PathBuf)>();
        let shared = inner.clone();
        std::thread::Builder::new()
            .name("fount-adapter-loader".into())
            .spawn(move || {
                for (name, version, dir) in rx {
                    let start = Instant::now();
                    let result = LoraAdapter::load(&dir, &cfg, dtype, &device);
                    let Ok(mut s) = shared.lock() else { return };
                    let key = (name, version);
                    s.loading.remove(&key);
                    match result {
                        Ok(a) => {
                            s.load_times.push(start.elapsed());
                            s.bytes += a.size_bytes();
                            s.tick += 1;
                            let tick = s.tick;
                            s.loaded.insert(key, (Arc::new(a), tick));
                            evict(&mut s, cap_bytes);
                        }
                        Err(e) => {
                            s.failed.insert(key, e.to_string());
                        }
                    }
                }
            })
            .ok();
        AdapterStore {
            inner,
            loader: tx,
            cap_bytes,
        }
    }

    /// Registers `dir` (a PEFT adapter directory) as the newest version of `name`; returns the
    /// version. Requests submitted from now on use it; running ones keep theirs.
    pub fn register(&self, name: &str, dir: impl Into<PathBuf>) -> u64 {
        let dir = dir.into();
        let Ok(mut s) = self.inner.lock() else {
            return 0;
        };
        s.next_version += 1;
        let v = s.next_version;
        s.registry.insert(name.to_string(), (v, dir.clone()));
        s.paths.insert((name.to_string(), v), dir);
        v
    }

    /// Removes `name`: new requests can no longer use it; streams already running on it finish
    /// on their pinned version, and its loaded weights are dropped from the cache. Returns
    /// whether it was registered.
    pub fn remove(&self, name: &str) -> bool {
        let Ok(mut s) = self.inner.lock() else {
            return false;
        };
        let found = s.registry.remove(name).is_some();
        let gone: Vec<(String, u64)> = s.loaded.keys().filter(|k| k.0 == name).cloned().collect();
        for k in gone {
            if let Some((a, _)) = s.loaded.remove(&k) {
                s.bytes -= a.size_bytes();
            }
        }
        found
    }

    /// The registered adapters: name, current version and directory, sorted by name.
    pub fn list(&self) -> Vec<(String, u64, PathBuf)> {
        let Ok(s) = self.inner.lock() else {
            return Vec::new();
        };
        let mut out: Vec<(String, u64, PathBuf)> = s
            .registry
            .iter()
            .map(|(n, (v, d))| (n.clone(), *v, d.clone()))
            .collect();
        out.sort();
        out
    }

    /// The current version of `name`.
    pub fn current(&self, name: &str) -> Option<u64> {
        self.inner.lock().ok()?.registry.get(name).map(|(v, _)| *v)
    }

    /// The state of a version, asking the loader for it if it is not loaded.
    pub fn get(&self, name: &str, version: u64) -> AdapterState {
        let Ok(mut s) = self.inner.lock() else {
            return AdapterState::Unknown;
        };
        let key = (name.to_string(), version);
        s.tick += 1;
        let tick = s.tick;
        if let Some((a, t)) = s.loaded.get_mut(&key) {
            *t = tick;
            return AdapterState::Ready(a.clone());
        }
        if let Some(e) = s.failed.get(&key) {
            return AdapterState::Failed(e.clone());
        }
        if s.loading.contains(&key) {
            return AdapterState::Loading;
        }
        let Some(dir) = s.paths.get(&key).cloned() else {
            return AdapterState::Unknown;
        };
        s.loading.insert(key.clone());
        drop(s);
        if self.loader.send((key.0, key.1, dir)).is_err() {
            return AdapterState::Failed("the adapter loader has stopped".into());
        }
        AdapterState::Loading
    }

    /// Adapters loaded now, and the bytes they hold.
    pub fn resident(&self) -> (usize, usize) {
        self.inner
            .lock()
            .map_or((0, 0), |s| (s.loaded.len(), s.bytes))
    }

    /// How long each load took (file read and conversion), oldest first.
    pub fn load_times(&self) -> Vec<Duration> {
        self.inner
            .lock()
            .map_or(Vec::new(), |s| s.load_times.clone())
    }

    /// The memory cap.
    pub fn cap_bytes(&self) -> usize {
        self.cap_bytes
    }
}

fn evict(s: &mut Inner, cap: usize) {
    while s.bytes > cap && s.loaded.len() > 1 {
        let Some(oldest) = s
            .loaded
            .iter()
            .min_by_key(|(_, (_, t))| *t)
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        if let Some((a, _)) = s.loaded.remove(&oldest) {
            s.bytes -= a.size_bytes();
        }
    }
}
