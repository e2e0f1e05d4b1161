//! OpenAI's Files API for the files fine-tuning reads: upload (multipart), list (newest first,
//! cursor `after`), retrieve, content, delete. A file is private to the tenant that uploaded it
//! (another tenant's id answers 404, as a missing one); its bytes are written under the data
//! directory (`files/{tenant}/{id}`, synced, then renamed into place) before its record is
//! committed, so a listed file always has its bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult};
use crate::extract::QueryParams;
use crate::state::AppState;
use crate::tenancy::Caller;

/// Where files are kept and how large one may be.
#[derive(Debug, Clone)]
pub struct FilesConfig {
    /// The directory of every tenant's files.
    pub dir: PathBuf,
    /// The largest upload, in bytes.
    pub max_bytes: usize,
}

/// The purposes a file may be uploaded for (fine-tuning's, for now).
pub const PURPOSES: &[&str] = &["fine-tune"];

/// A file, as OpenAI's `OpenAIFile`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileObject {
    /// `file-…`.
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Its size in bytes.
    pub bytes: i64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds after which it is deleted (never, here).
    pub expires_at: Option<i64>,
    /// The name it was uploaded with.
    pub filename: String,
    /// What it is for.
    pub purpose: String,
    /// Always `processed`: a file is ready once its upload is answered.
    pub status: String,
    /// Always null.
    pub status_details: Option<String>,
}

/// `GET /v1/files`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    /// Always `list`.
    pub object: String,
    /// The page.
    pub data: Vec<FileObject>,
    /// The first file's id on this page.
    pub first_id: Option<String>,
    /// The last file's id on this page: pass it as `after` for the next.
    pub last_id: Option<String>,
    /// Whether more files follow.
    pub has_more: bool,
}

/// `DELETE /v1/files/{file_id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileDeleted {
    /// The file.
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Always true.
    pub deleted: bool,
}

/// The multipart form of `POST /v1/files`.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct FileUpload {
    /// The file (JSONL, one `{"messages": [...]}` per line, for `fine-tune`).
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
    /// `fine-tune`.
    pub purpose: String,
}

/// The query of `GET /v1/files`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Only files of this purpose.
    #[serde(default)]
    pub purpose: Option<String>,
    /// Files per page, 1 to 10,000 (default 10,000).
    #[serde(default)]
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
    /// `asc` or `desc` (the default) by creation time.
    #[serde(default)]
    pub order: Option<String>,
    /// The id of the last file of the previous page.
    #[serde(default)]
    pub after: Option<String>,
}

fn object(f: &fount_store::FileRecord) -> FileObject {
    FileObject {
        id: f.id.clone(),
        object: "file".into(),
        bytes: f.bytes,
        created_at: f.created_at_ms / 1000,
        expires_at: None,
        filename: f.filename.clone(),
        purpose: f.purpose.clone(),
        status: "processed".into(),
        status_details: None,
    }
}

fn no_such(id: &str) -> ApiError {
    ApiError::NotFound {
        message: format!("No such File object: {id}"),
        param: Some("file_id".into()),
        code: "not_found",
    }
}

/// The caller and the files configuration, or why there are none.
fn context<'a>(
    state: &'a AppState,
    caller: &'a Option<Extension<Caller>>,
) -> ApiResult<(&'a Caller, &'a FilesConfig, &'a fount_store::Store)> {
    match (state.tenancy(), state.files(), caller) {
        (Some(t), Some(cfg), Some(Extension(c))) => Ok((c, cfg, t.store())),
        _ => Err(ApiError::NotFound {
            message: "files are kept only with tenancy on (fount serve --data-dir)".into(),
            param: None,
            code: "not_found",
        }),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// Removes a file; a failure to do so only leaves a stray file.
async fn discard(path: &Path) {
    let _ = tokio::fs::remove_file(path).await;
}

/// An upload being written: removed when dropped before it is kept, so an upload refused, failed
/// or abandoned by its client (the handler is then dropped mid-stream) leaves nothing behind.
struct Partial {
    path: PathBuf,
    kept: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.kept {
            let _ = fs_err::remove_file(&self.path);
        }
    }
}

/// `POST /v1/files`: uploads a file.
#[utoipa::path(
    post,
    path = "/v1/files",
    tag = "files",
    request_body(content = FileUpload, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The file, stored", body = FileObject),
        (status = 400, description = "No file, a purpose other than fine-tune, not JSONL", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the files scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "Tenancy is off", body = crate::protocol::ErrorResponse),
        (status = 413, description = "Larger than --max-file", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn upload(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<Json<FileObject>> {
    let (caller, cfg, store) = context(&state, &caller)?;
    let mut form = form.map_err(|e| ApiError::invalid("file", e.body_text()))?;
    let id = format!("file-{}", hex(&rand::random::<[u8; 12]>()));
    let dir = cfg.dir.join(&caller.tenant.id);
    tokio::fs::create_dir_all(&dir).await.map_err(internal)?;
    let mut partial = Partial {
        path: dir.join(format!("{id}.partial")),
        kept: false,
    };
    let mut purpose = None;
    let mut upload: Option<(String, i64, String)> = None;
    let field_error = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge {
                limit: cfg.max_bytes,
            }
        } else {
            ApiError::invalid("file", e.body_text())
        }
    };
    let result: ApiResult<()> = async {
        while let Some(mut field) = form.next_field().await.map_err(field_error)? {
            match field.name() {
                Some("purpose") => {
                    purpose = Some(field.text().await.map_err(field_error)?);
                }
                Some("file") => {
                    if upload.is_some() {
                        return Err(ApiError::invalid("file", "one file per upload"));
                    }
                    let name = field.file_name().unwrap_or("").to_string();
                    let mut out = tokio::fs::File::create(&partial.path)
                        .await
                        .map_err(internal)?;
                    let mut hash = Sha256::new();
                    let mut bytes = 0usize;
                    while let Some(chunk) = field.chunk().await.map_err(field_error)? {
                        bytes += chunk.len();
                        if bytes > cfg.max_bytes {
                            return Err(ApiError::TooLarge {
                                limit: cfg.max_bytes,
                            });
                        }
                        hash.update(&chunk);
                        out.write_all(&chunk).await.map_err(internal)?;
                    }
                    out.sync_all().await.map_err(internal)?;
                    upload = Some((name, bytes as i64, hex(&hash.finalize())));
                }
                // other fields (`expires_after[…]`) are accepted and not kept
                _ => {}
            }
        }
        Ok(())
    }
    .await;
    result?;
    let checked = (|| {
        let purpose = purpose
            .clone()
            .ok_or_else(|| ApiError::invalid("purpose", "a purpose is required: fine-tune"))?;
        if !PURPOSES.contains(&purpose.as_str()) {
            return Err(ApiError::invalid(
                "purpose",
                format!("purpose {purpose:?} is not supported here; files are for fine-tune"),
            ));
        }
        let (name, bytes, sha) = upload
            .clone()
            .ok_or_else(|| ApiError::invalid("file", "no file in the form (a `file` field)"))?;
        if !name.ends_with(".jsonl") {
            return Err(ApiError::invalid(
                "file",
                format!("Invalid file format for Fine-Tuning API. Must be .jsonl (got {name:?})"),
            ));
        }
        Ok((purpose, name, bytes, sha))
    })();
    let (purpose, filename, bytes, sha256) = checked?;
    // with an artifacts store the bytes are kept there too: every replica (and every pool
    // node) reads them, whichever replica took the upload
    if let Some(a) = state.artifacts() {
        a.put_file(
            &partial.path,
            &crate::artifacts::file_key(&caller.tenant.id, &id),
        )
        .await
        .map_err(internal)?;
    }
    tokio::fs::rename(&partial.path, dir.join(&id))
        .await
        .map_err(internal)?;
    partial.kept = true;
    let record = fount_store::FileRecord {
        id,
        tenant_id: caller.tenant.id.clone(),
        filename,
        purpose,
        bytes,
        sha256,
        created_at_ms: fount_store::now_ms(),
    };
    if let Err(e) = store.insert_file(&record).await {
        discard(&dir.join(&record.id)).await;
        return Err(internal(e));
    }
    Ok(Json(object(&record)))
}

/// `GET /v1/files`: the caller's files, newest first.
#[utoipa::path(
    get,
    path = "/v1/files",
    tag = "files",
    params(FileQuery),
    responses(
        (status = 200, description = "A page of files", body = FileList),
        (status = 400, description = "A bad limit or order", body = crate::protocol::ErrorResponse),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the files scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "Tenancy is off, or `after` names no file", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    QueryParams(q): QueryParams<FileQuery>,
) -> ApiResult<Json<FileList>> {
    let (caller, _, store) = context(&state, &caller)?;
    let limit = match q.limit.as_deref() {
        None => 10_000,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=10_000).contains(l))
            .ok_or_else(|| ApiError::invalid("limit", "limit is 1 to 10000"))?,
    };
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => return Err(ApiError::invalid("order", "order is asc or desc")),
    };
    let page = fount_store::FilePage {
        purpose: q.purpose.as_deref(),
        after: q.after.as_deref(),
        limit,
        ascending,
    };
    let (files, has_more) = match store.files(&caller.tenant.id, &page).await {
        Ok(r) => r,
        Err(fount_store::Error::NotFound(_)) => {
            return Err(no_such(q.after.as_deref().unwrap_or("")))
        }
        Err(e) => return Err(internal(e)),
    };
    let data: Vec<FileObject> = files.iter().map(object).collect();
    Ok(Json(FileList {
        object: "list".into(),
        first_id: data.first().map(|f| f.id.clone()),
        last_id: data.last().map(|f| f.id.clone()),
        data,
        has_more,
    }))
}

async fn find(
    state: &AppState,
    caller: &Option<Extension<Caller>>,
    id: &str,
) -> ApiResult<(fount_store::FileRecord, PathBuf)> {
    let (caller, cfg, store) = context(state, caller)?;
    let f = store
        .file(&caller.tenant.id, id)
        .await
        .map_err(internal)?
        .ok_or_else(|| no_such(id))?;
    let path = cfg.dir.join(&f.tenant_id).join(&f.id);
    Ok((f, path))
}

/// Fetches a file another replica took into `path` from the artifacts store, unless it is
/// here already (without a store, a file is only where it was uploaded).
pub(crate) async fn local_copy(
    state: &AppState,
    tenant_id: &str,
    id: &str,
    path: &Path,
) -> ApiResult<()> {
    if let (Some(a), false) = (state.artifacts(), path.exists()) {
        a.fetch_file(&crate::artifacts::file_key(tenant_id, id), path)
            .await
            .map_err(internal)?;
    }
    Ok(())
}

/// `GET /v1/files/{file_id}`: one of the caller's files.
#[utoipa::path(
    get,
    path = "/v1/files/{file_id}",
    tag = "files",
    params(("file_id" = String, Path, description = "The file's id")),
    responses(
        (status = 200, description = "The file", body = FileObject),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the files scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "No such file of the caller's", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<FileObject>> {
    let (f, _) = find(&state, &caller, &id).await?;
    Ok(Json(object(&f)))
}

/// `GET /v1/files/{file_id}/content`: the file's bytes.
#[utoipa::path(
    get,
    path = "/v1/files/{file_id}/content",
    tag = "files",
    params(("file_id" = String, Path, description = "The file's id")),
    responses(
        (status = 200, description = "The bytes as uploaded", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the files scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "No such file of the caller's", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn content(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Response> {
    let (f, path) = find(&state, &caller, &id).await?;
    local_copy(&state, &f.tenant_id, &f.id, &path).await?;
    let file = tokio::fs::File::open(&path).await.map_err(internal)?;
    // streamed in 64 KiB reads: a file may be hundreds of megabytes
    let chunks = futures_util::stream::unfold(Some(file), |file| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file?;
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(axum::body::Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err::<axum::body::Bytes, _>(e), None)),
        }
    });
    let body = Body::from_stream(chunks);
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// `DELETE /v1/files/{file_id}`: deletes one of the caller's files.
#[utoipa::path(
    delete,
    path = "/v1/files/{file_id}",
    tag = "files",
    params(("file_id" = String, Path, description = "The file's id")),
    responses(
        (status = 200, description = "Deleted", body = FileDeleted),
        (status = 401, description = "No valid API key", body = crate::protocol::ErrorResponse),
        (status = 403, description = "The key lacks the files scope", body = crate::protocol::ErrorResponse),
        (status = 404, description = "No such file of the caller's", body = crate::protocol::ErrorResponse),
    )
)]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    caller: Option<Extension<Caller>>,
    UrlPath(id): UrlPath<String>,
) -> ApiResult<Json<FileDeleted>> {
    let (f, path) = find(&state, &caller, &id).await?;
    let (caller, _, store) = context(&state, &caller)?;
    if !store
        .delete_file(&caller.tenant.id, &f.id)
        .await
        .map_err(internal)?
    {
        return Err(no_such(&id));
    }
    // the record is gone first: a file listed always has its bytes
    discard(&path).await;
    if let Some(a) = state.artifacts() {
        if let Err(e) = a
            .delete(&crate::artifacts::file_key(&caller.tenant.id, &f.id))
            .await
        {
            tracing::warn!(file = %f.id, error = %e, "deleting a file from the artifacts store");
        }
    }
    Ok(Json(FileDeleted {
        id: f.id,
        object: "file".into(),
        deleted: true,
    }))
}

/// Lower-case hex of `b`.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
