//! The ledger over HTTP, and what the server writes to it.
//!
//! Public and read-only, as C2SP `tlog-tiles` serves a log: `GET /ledger/checkpoint` (the latest
//! signed checkpoint with its witnesses' cosignatures), `GET /ledger/tile/<L>/<N>[.p/<W>]` and
//! `GET /ledger/tile/entries/<N>[.p/<W>]` (full tiles never change and are cached forever). A
//! tenant fetches its own bill with `GET /v1/usage/proof?hour=…`: each hour's records, the
//! entry that commits them and the entry's inclusion proof.
//!
//! In the background ([`run`]): every complete hour's usage and audit records are committed
//! (and everything at shutdown, [`commit_all_usage`]); new checkpoints are taken to the
//! configured witnesses and stored with their cosignatures.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use fount_ledger::note::{Note, Verifier};
use fount_ledger::statement::{self, FileDigest};
use fount_ledger::tiles::Tile;
use fount_ledger::usage::{commit_usage, hour_of, usage_leaf, HOUR};
use fount_ledger::witness::{add_checkpoint_body, check_cosignatures, Witness};
use fount_ledger::Ledger;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;
use crate::state::AppState;
use crate::tenancy::Caller;

/// A witness the log takes its checkpoints to.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// Its `add-checkpoint` URL prefix (`http://host:port`).
    pub url: String,
    /// Its cosignature verifier key.
    pub key: Verifier,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn ledger_of(state: &AppState) -> ApiResult<&Ledger> {
    state.ledger().ok_or_else(|| ApiError::NotFound {
        message: "this server keeps no ledger (it runs with --no-auth)".into(),
        param: None,
        code: "not_found",
    })
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    cache: &'static str,
    body: Vec<u8>,
) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, cache),
        ],
        Body::from(body),
    )
        .into_response()
}

/// `GET /ledger/checkpoint`: the latest signed checkpoint (C2SP tlog-checkpoint as a signed note,
/// with any witnesses' cosignatures).
#[utoipa::path(
    get,
    path = "/ledger/checkpoint",
    tag = "ledger",
    responses(
        (status = 200, description = "The signed checkpoint", content_type = "text/plain", body = String),
        (status = 404, description = "No ledger is kept", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn checkpoint(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    let note = ledger_of(&state)?.checkpoint().await.map_err(internal)?;
    Ok(text(
        StatusCode::OK,
        "text/plain; charset=utf-8",
        "no-store",
        note.into_bytes(),
    ))
}

/// `GET /ledger/tile/{path}`: a C2SP tlog-tiles tile (`<L>/<N>[.p/<W>]`: 32-byte hashes) or
/// entry bundle (`entries/<N>[.p/<W>]`: each entry as a big-endian 16-bit length and its bytes).
#[utoipa::path(
    get,
    path = "/ledger/tile/{path}",
    tag = "ledger",
    params(("path" = String, Path, description = "`0/x001/234.p/5`, `entries/000`, …")),
    responses(
        (status = 200, description = "The tile", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "No such tile (yet)", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn tile(
    State(state): State<Arc<AppState>>,
    Path(path): Path<String>,
) -> ApiResult<Response> {
    let ledger = ledger_of(&state)?;
    let not_found = || ApiError::NotFound {
        message: format!("no tile {path}"),
        param: None,
        code: "not_found",
    };
    let t = Tile::parse(&path).ok_or_else(not_found)?;
    let bytes = ledger
        .tile(t)
        .await
        .map_err(internal)?
        .ok_or_else(not_found)?;
    let cache = if t.width == fount_ledger::tiles::WIDTH {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=60"
    };
    Ok(text(
        StatusCode::OK,
        "application/octet-stream",
        cache,
        bytes,
    ))
}

/// `GET /v1/usage/proof` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProofQuery {
    /// The hour: Unix seconds of any instant in it.
    #[param(value_type = i64, required = true)]
    pub hour: Option<String>,
    /// With an admin key: whose bill (the caller's own otherwise).
    pub tenant: Option<String>,
}

/// One entry committing some of the hour's records.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageCommitment {
    /// The entry's index in the log.
    pub index: u64,
    /// The entry (an in-toto statement whose subject digest is the records' Merkle root).
    #[schema(value_type = Object)]
    pub statement: Value,
    /// The entry's exact bytes, base64: its leaf hash is SHA-256(0x00 ‖ these bytes).
    pub leaf: String,
    /// The records, each the exact JSON that was hashed as a leaf, in the order hashed.
    pub records: Vec<String>,
    /// A C2SP tlog-proof of the entry against the latest checkpoint.
    pub proof: String,
}

/// `GET /v1/usage/proof`.
#[derive(Debug, Serialize, ToSchema)]
pub struct UsageProof {
    /// Always `usage.proof`.
    pub object: &'static str,
    /// The tenant.
    pub tenant_id: String,
    /// The hour's start, Unix seconds.
    pub hour: i64,
    /// The log's verifier key.
    pub log: String,
    /// The entries that commit the hour's records.
    pub commitments: Vec<UsageCommitment>,
    /// Records of the hour not committed yet (the hour is committed once it is over).
    pub uncommitted: usize,
}

/// `GET /v1/usage/proof?hour=…`: the caller's usage records of one hour with proof that they are
/// the ones committed to the ledger.
#[utoipa::path(
    get,
    path = "/v1/usage/proof",
    tag = "tenancy",
    params(ProofQuery),
    responses(
        (status = 200, description = "The hour's records and their commitments", body = UsageProof),
        (status = 400, description = "No hour, or not a number", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "Another tenant's bill without an admin key", body = crate::protocol::ErrorResponse),
        (status = 404, description = "Tenancy is off", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn usage_proof(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    QueryParams(q): QueryParams<ProofQuery>,
) -> ApiResult<Json<UsageProof>> {
    let ledger = ledger_of(&state)?;
    // Unix seconds from 1970 to the year 5138: anything else is not an hour of this log
    let hour = q
        .hour
        .as_deref()
        .and_then(|h| h.parse::<i64>().ok())
        .filter(|h| (0..=100_000_000_000).contains(h))
        .ok_or_else(|| {
            ApiError::invalid("hour", "hour is the Unix seconds of an instant in the hour")
        })?;
    let Some(Extension(c)) = caller else {
        return Err(ApiError::NotFound {
            message: "bills are kept only with tenancy on".into(),
            param: None,
            code: "not_found",
        });
    };
    let tenant = match q.tenant {
        Some(t) if t != c.tenant.id => {
            if !c.is_admin() {
                return Err(ApiError::Forbidden("admin"));
            }
            t
        }
        _ => c.tenant.id.clone(),
    };
    let from = hour_of(hour * 1000);
    let store = ledger.store();
    let commits = store
        .ledger_usage_commits(Some(&tenant), from, from + HOUR)
        .await
        .map_err(internal)?;
    let checkpoint = ledger.checkpoint().await.map_err(internal)?;
    let mut out = Vec::new();
    let mut committed = 0;
    for cm in commits {
        let records = store
            .usage_of_commit(cm.entry_index)
            .await
            .map_err(internal)?;
        committed += records.len();
        let entry = ledger.entry(cm.entry_index).await.map_err(internal)?;
        use base64::Engine as _;
        out.push(UsageCommitment {
            index: cm.entry_index,
            statement: serde_json::from_str(&entry.body).map_err(internal)?,
            leaf: base64::engine::general_purpose::STANDARD.encode(entry.body.as_bytes()),
            records: records.iter().map(usage_leaf).collect(),
            proof: ledger
                .proof_at(cm.entry_index, &checkpoint)
                .await
                .map_err(internal)?,
        });
    }
    let all = store
        .usage(Some(&tenant), from, from + HOUR)
        .await
        .map_err(internal)?
        .len();
    Ok(Json(UsageProof {
        object: "usage.proof",
        tenant_id: tenant,
        hour: from / 1000,
        log: ledger.verifier_key(),
        commitments: out,
        uncommitted: all.saturating_sub(committed),
    }))
}

/// Logs an administrative act (when a ledger is kept). The act is done already: a ledger that
/// cannot be written is reported, not the request's failure.
pub async fn log_act(state: &AppState, act: &str, (subject, details): (String, Value)) {
    if let Some(ledger) = state.ledger() {
        if let Err(e) = ledger.log_admin(act, &subject, details).await {
            tracing::error!(act, "ledger: {e}");
        }
    }
}

/// Logs that model or adapter `name` (files in `dir`) is now served; a failure is reported, not
/// returned (the model is registered already).
pub async fn log_model(state: &AppState, name: &str, dir: &std::path::Path, role: &str) {
    if let Some(ledger) = state.ledger() {
        model_entry(ledger.clone(), name, dir, role).await;
    }
}

/// [`log_model`] on a task of its own, for a caller that does not wait.
pub fn log_model_in_background(state: &AppState, name: &str, dir: &std::path::Path, role: &str) {
    if let Some(ledger) = state.ledger().cloned() {
        let (n, d, r) = (name.to_string(), dir.to_path_buf(), role.to_string());
        tokio::spawn(async move { model_entry(ledger, &n, &d, &r).await });
    }
}

async fn model_entry(ledger: Ledger, name: &str, dir: &std::path::Path, role: &str) {
    // hashing the files reads them whole: off the async workers
    let (n, d, r) = (name.to_string(), dir.to_path_buf(), role.to_string());
    let logged = match tokio::task::spawn_blocking(move || statement::model(&n, &d, &r)).await {
        Ok(Ok(st)) => ledger.log("model", &st).await.map(|_| ()),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(fount_ledger::Error::Entry(e.to_string())),
    };
    if let Err(e) = logged {
        tracing::error!(name, "ledger: {e}");
    }
}

/// Logs what this server serves (binary version, the model's and every adapter's digests).
pub async fn log_deployment(
    state: &AppState,
    model_dir: &std::path::Path,
) -> fount_ledger::Result<u64> {
    let Some(ledger) = state.ledger() else {
        return Ok(0);
    };
    let mut subjects = Vec::new();
    for f in statement::artifact_files(model_dir)? {
        subjects.push(FileDigest {
            name: format!("{}/{}", state.cfg.model_name, f.name),
            sha256: f.sha256,
        });
    }
    let mut adapters = Vec::new();
    for (name, _, dir) in state.engine().adapters().list() {
        for f in statement::artifact_files(&dir)? {
            subjects.push(FileDigest {
                name: format!("{name}/{}", f.name),
                sha256: f.sha256,
            });
        }
        adapters.push(json!({"name": name, "path": dir.display().to_string()}));
    }
    let st = statement::statement(
        &subjects,
        statement::DEPLOYMENT_PREDICATE,
        json!({
            "fount": env!("CARGO_PKG_VERSION"),
            "model": {"name": state.cfg.model_name, "path": model_dir.display().to_string()},
            "adapters": adapters,
            "started_ms": fount_store::now_ms(),
        }),
    );
    ledger.log("deployment", &st).await
}

/// Commits every usage and audit record stored so far (at shutdown, after the last requests
/// finished).
pub async fn commit_all_usage(state: &AppState) {
    if let Some(ledger) = state.ledger() {
        commit_before(ledger, i64::MAX).await;
    }
}

/// Commits the usage records and the audit records created before `before_ms`.
async fn commit_before(ledger: &Ledger, before_ms: i64) {
    match commit_usage(ledger, before_ms).await {
        Ok(n) if n > 0 => tracing::info!(entries = n, "ledger: usage committed"),
        Ok(_) => {}
        Err(e) => tracing::error!("ledger: committing usage: {e}"),
    }
    match fount_ledger::audit::commit_audit(ledger, before_ms).await {
        Ok(n) if n > 0 => tracing::info!(entries = n, "ledger: audit records committed"),
        Ok(_) => {}
        Err(e) => tracing::error!("ledger: committing audit records: {e}"),
    }
}

/// The background work: hourly usage and audit commitments and witnesses' cosignatures.
pub async fn run(state: Arc<AppState>, witnesses: Vec<WitnessConfig>, every: Duration) {
    let Some(ledger) = state.ledger().cloned() else {
        return;
    };
    let mut last_sent = 0u64;
    let mut sizes: Vec<u64> = vec![0; witnesses.len()];
    loop {
        // records arrive after their request ends: an hour is committed a minute after it ends,
        // and a record that comes later still gets an entry of its own next time
        let before = hour_of(fount_store::now_ms() - 60_000);
        commit_before(&ledger, before).await;
        if !witnesses.is_empty() {
            match cosign(&ledger, &witnesses, &mut sizes, last_sent).await {
                Ok(Some(size)) => last_sent = size,
                Ok(None) => {}
                Err(e) => tracing::warn!("ledger: witnesses: {e}"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Takes the latest checkpoint to every witness (when it grew) and stores it with their
/// cosignatures. Returns the size once every witness cosigned it.
pub async fn cosign(
    ledger: &Ledger,
    witnesses: &[WitnessConfig],
    sizes: &mut [u64],
    last_sent: u64,
) -> fount_ledger::Result<Option<u64>> {
    let note = ledger.checkpoint().await?;
    let c = ledger.open_checkpoint(&note)?;
    if c.size == 0 || c.size == last_sent {
        return Ok(None);
    }
    let mut lines = Vec::new();
    for (w, have) in witnesses.iter().zip(sizes.iter_mut()) {
        if *have == c.size {
            continue;
        }
        // one retry: a 409 says what size the witness holds
        for _ in 0..2 {
            let proof = ledger.consistency_proof(*have, c.size).await?;
            let body = add_checkpoint_body(*have, &proof, &note);
            // one witness down or misbehaving does not keep the others' cosignatures away
            let (status, resp) = match post(
                &format!("{}/add-checkpoint", w.url.trim_end_matches('/')),
                body,
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(witness = %w.url, "the witness is unreachable: {e}");
                    break;
                }
            };
            match status {
                200 => {
                    match check_cosignatures(&note, &resp, &w.key) {
                        Ok(l) => {
                            lines.extend(l);
                            *have = c.size;
                        }
                        Err(e) => tracing::error!(witness = %w.url, "a bad cosignature: {e}"),
                    }
                    break;
                }
                409 => match resp.trim().parse::<u64>() {
                    Ok(s) if s <= c.size => *have = s,
                    _ => {
                        tracing::error!(witness = %w.url, "the witness holds a checkpoint this log never made ({resp:?})");
                        break;
                    }
                },
                s => {
                    tracing::warn!(witness = %w.url, status = s, "the witness refused: {}", resp.trim());
                    break;
                }
            }
        }
    }
    let all = witnesses
        .iter()
        .zip(sizes.iter())
        .all(|(_, s)| *s == c.size);
    if !lines.is_empty() {
        let cosigned = Note::parse(&note)?.with_signatures(&lines);
        ledger.store().ledger_cosigned(c.size, &cosigned).await?;
    }
    // a witness that did not cosign is asked again next round
    Ok(all.then_some(c.size))
}

async fn post(url: &str, body: String) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<axum::body::Bytes>>();
    let req = hyper::Request::post(url)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(axum::body::Bytes::from(body)))
        .map_err(|e| format!("{url}: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| format!("{url}: no answer in 10 s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// The HTTP face of a witness (`fount ledger witness`): `POST /add-checkpoint` per C2SP
/// `tlog-witness`.
pub fn witness_router(w: Arc<Witness>) -> axum::Router {
    axum::Router::new()
        .route(
            "/add-checkpoint",
            axum::routing::post(|State(w): State<Arc<Witness>>, body: String| async move {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                match w.add_checkpoint(&body, now) {
                    Ok(sig) => text(
                        StatusCode::OK,
                        "text/plain; charset=utf-8",
                        "no-store",
                        sig.into_bytes(),
                    ),
                    Err(r) => {
                        let status = StatusCode::from_u16(r.status)
                            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                        let ct = if r.status == 409 {
                            "text/x.tlog.size"
                        } else {
                            "text/plain; charset=utf-8"
                        };
                        text(status, ct, "no-store", r.body.into_bytes())
                    }
                }
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .with_state(w)
}

pub use axum::Router;

/// Serves a router (the witness's) on `listener` until the process is stopped.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
) -> std::io::Result<()> {
    axum::serve(listener, router).await
}
