use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use fount_server::files::FilesConfig;
use fount_server::{app, AppState};
use fount_store::testing::stores;
use fount_store::{Scope, Store};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::util::{call_as, key, state, Reply};

/// A server with tenancy and files on over `store`, files under `dir`, uploads up to `max`.
fn files_state(store: &Store, dir: &std::path::Path, max: usize) -> Arc<AppState> {
    let s = state();
    s.enable_files(FilesConfig {
        dir: dir.to_path_buf(),
        max_bytes: max,
    });
    s.enable_tenancy(store.clone());
    s
}

/// A form field: its name, its file name (for a file), its bytes.
type Field<'a> = (&'a str, Option<&'a str>, &'a [u8]);

/// `POST /v1/files` with a multipart form of `fields`.
async fn upload(s: &Arc<AppState>, key: &str, fields: &[Field<'_>]) -> Reply {
    let boundary = "fount-test-boundary";
    let mut body = Vec::new();
    for (name, filename, bytes) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/files")
        .header("authorization", format!("Bearer {key}"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .unwrap();
    let res = app(s.clone()).oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

const DATA: &[u8] = b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n";

#[tokio::test]
async fn files_are_uploaded_listed_read_and_deleted_by_their_tenant_only() {
    for (store, _dir) in stores("files_round_trip").await {
        let b = store.backend();
        let dir = tempfile::tempdir().unwrap();
        let s = files_state(&store, dir.path(), 1 << 20);
        let acme = key(&store, "acme", &[Scope::Files]).await;
        let other = key(&store, "other", &[Scope::Files, Scope::Inference]).await;
        let mut ids = Vec::new();
        for i in 0..3 {
            let name = format!("train-{i}.jsonl");
            let r = upload(
                &s,
                &acme,
                &[("purpose", None, b"fine-tune"), ("file", Some(&name), DATA)],
            )
            .await;
            assert_eq!(r.status, StatusCode::OK, "{b:?}: {}", r.body);
            let f = r.json();
            assert!(f["id"].as_str().unwrap().starts_with("file-"));
            assert_eq!(f["object"], "file");
            assert_eq!(f["bytes"], DATA.len());
            assert_eq!(f["filename"], name);
            assert_eq!(
                (f["purpose"].as_str(), f["status"].as_str()),
                (Some("fine-tune"), Some("processed"))
            );
            ids.push(f["id"].as_str().unwrap().to_string());
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        // newest first, a page at a time
        let r = call_as(&s, &acme, Method::GET, "/v1/files?limit=2", "").await;
        let page = r.json();
        let got: Vec<&str> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].as_str().unwrap())
            .collect();
        assert_eq!(got, [ids[2].as_str(), ids[1].as_str()], "{b:?}");
        assert_eq!(page["has_more"], true);
        assert_eq!(page["last_id"], ids[1].as_str());
        let r = call_as(
            &s,
            &acme,
            Method::GET,
            &format!("/v1/files?limit=2&after={}", ids[1]),
            "",
        )
        .await;
        let page = r.json();
        assert_eq!(page["data"][0]["id"], ids[0].as_str());
        assert_eq!(page["has_more"], false);
        let r = call_as(
            &s,
            &acme,
            Method::GET,
            "/v1/files?order=asc&purpose=fine-tune",
            "",
        )
        .await;
        assert_eq!(r.json()["data"][0]["id"], ids[0].as_str());
        // retrieve and content
        let r = call_as(&s, &acme, Method::GET, &format!("/v1/files/{}", ids[0]), "").await;
        assert_eq!(r.json()["filename"], "train-0.jsonl");
        let r = call_as(
            &s,
            &acme,
            Method::GET,
            &format!("/v1/files/{}/content", ids[0]),
            "",
        )
        .await;
        assert_eq!((r.status, r.body.as_bytes()), (StatusCode::OK, DATA));
        // another tenant sees nothing of them
        for (m, path) in [
            (Method::GET, format!("/v1/files/{}", ids[0])),
            (Method::GET, format!("/v1/files/{}/content", ids[0])),
            (Method::DELETE, format!("/v1/files/{}", ids[0])),
        ] {
            let r = call_as(&s, &other, m, &path, "").await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.body);
            assert!(
                r.error().0.contains(&ids[0]) || r.body.contains(&ids[0]),
                "{}",
                r.body
            );
        }
        let r = call_as(&s, &other, Method::GET, "/v1/files", "").await;
        assert_eq!(r.json()["data"].as_array().unwrap().len(), 0);
        // deleted: gone from the list, the content and the disk
        let r = call_as(
            &s,
            &acme,
            Method::DELETE,
            &format!("/v1/files/{}", ids[0]),
            "",
        )
        .await;
        assert_eq!(r.json()["deleted"], true, "{}", r.body);
        let r = call_as(
            &s,
            &acme,
            Method::GET,
            &format!("/v1/files/{}/content", ids[0]),
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let r = call_as(
            &s,
            &acme,
            Method::DELETE,
            &format!("/v1/files/{}", ids[0]),
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        let on_disk = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|t| std::fs::read_dir(t.path()).unwrap().count())
            .sum::<usize>();
        assert_eq!(on_disk, 2, "{b:?}");
    }
}

#[tokio::test]
async fn bad_uploads_get_clear_errors_and_store_nothing() {
    for (store, _dir) in stores("files_errors").await {
        let dir = tempfile::tempdir().unwrap();
        let s = files_state(&store, dir.path(), 1024);
        let acme = key(&store, "acme", &[Scope::Files]).await;
        let cases: Vec<(Vec<Field>, StatusCode, &str)> = vec![
            (
                vec![("file", Some("t.jsonl"), DATA)],
                StatusCode::BAD_REQUEST,
                "purpose",
            ),
            (
                vec![("purpose", None, b"batch"), ("file", Some("t.jsonl"), DATA)],
                StatusCode::BAD_REQUEST,
                "purpose",
            ),
            (
                vec![("purpose", None, b"fine-tune")],
                StatusCode::BAD_REQUEST,
                "file",
            ),
            (
                vec![
                    ("purpose", None, b"fine-tune"),
                    ("file", Some("t.csv"), DATA),
                ],
                StatusCode::BAD_REQUEST,
                "file",
            ),
            (
                vec![
                    ("purpose", None, b"fine-tune"),
                    ("file", Some("t.jsonl"), &[b'x'; 4096]),
                ],
                StatusCode::PAYLOAD_TOO_LARGE,
                "",
            ),
        ];
        for (fields, status, param) in cases {
            let r = upload(&s, &acme, &fields).await;
            assert_eq!(r.status, status, "{}", r.body);
            if !param.is_empty() {
                assert_eq!(r.error().1.as_deref(), Some(param), "{}", r.body);
            }
        }
        // a JSON body where a form belongs
        let r = call_as(&s, &acme, Method::POST, "/v1/files", "{}").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        for (q, param) in [
            ("limit=0", "limit"),
            ("limit=x", "limit"),
            ("order=up", "order"),
        ] {
            let r = call_as(&s, &acme, Method::GET, &format!("/v1/files?{q}"), "").await;
            assert_eq!(
                (r.status, r.error().1.as_deref()),
                (StatusCode::BAD_REQUEST, Some(param)),
                "{q}"
            );
        }
        let r = call_as(&s, &acme, Method::GET, "/v1/files?after=file-nope", "").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        // nothing was kept: no record, no bytes, no partial file
        let r = call_as(&s, &acme, Method::GET, "/v1/files", "").await;
        assert_eq!(r.json()["data"].as_array().unwrap().len(), 0);
        let left: usize = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|t| std::fs::read_dir(t.path()).unwrap().count())
            .sum();
        assert_eq!(left, 0);
    }
}

#[tokio::test]
async fn files_need_the_files_scope_and_inference_needs_its_own() {
    for (store, _dir) in stores("files_scope").await {
        let dir = tempfile::tempdir().unwrap();
        let s = files_state(&store, dir.path(), 1024);
        let inference = key(&store, "acme", &[Scope::Inference]).await;
        let files = key(&store, "acme", &[Scope::Files]).await;
        let r = call_as(&s, &inference, Method::GET, "/v1/files", "").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.body.contains("files scope"), "{}", r.body);
        let r = call_as(&s, &files, Method::GET, "/v1/models", "").await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let r = call_as(&s, &files, Method::GET, "/v1/files", "").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    // without tenancy there are no files
    let s = state();
    let r = crate::util::call(&s, Method::GET, "/v1/files", "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}
