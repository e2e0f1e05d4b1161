//! The log in the store, on SQLite and PostgreSQL: appends, proofs and tiles equal an in-memory
//! tree's; `verify_log` passes, then names each kind of tampering.

use fount_ledger::log::{parse_tlog_proof, unhex};
use fount_ledger::merkle::{leaf_hash, verify_consistency, verify_inclusion, MemoryTree};
use fount_ledger::note::{Note, Signer, ED25519};
use fount_ledger::provenance::{record_artifact, verify_artifact};
use fount_ledger::statement::{dependencies, slsa, Run, SLSA_PROVENANCE};
use fount_ledger::tiles::Tile;
use fount_ledger::verify::verify_log;
use fount_ledger::{usage, Ledger};
use fount_store::testing::{execute, stores};
use fount_store::{UsageKind, UsageRecord};

fn entry(i: u64) -> String {
    format!("{{\"_type\":\"https://in-toto.io/Statement/v1\",\"n\":{i}}}")
}

fn ledger(store: fount_store::Store) -> Ledger {
    Ledger::new(
        store,
        Signer::generate("test.example/ledger", ED25519).unwrap(),
    )
}

#[tokio::test]
async fn appends_proofs_and_tiles_match_a_tree_held_in_memory() {
    for (store, _dir) in stores("ledger_appends").await {
        let backend = store.backend();
        let l = ledger(store);
        let mut mem = MemoryTree::new();
        let mut n = 0u64;
        // batches of varied sizes cross tile and power-of-two boundaries
        for batch in [1usize, 2, 5, 120, 200, 1, 300, 7] {
            let entries: Vec<(String, &str)> =
                (0..batch).map(|i| (entry(n + i as u64), "test")).collect();
            let a = l.append(&entries).await.unwrap();
            assert_eq!(a.first, n);
            for (e, _) in &entries {
                mem.push(leaf_hash(e.as_bytes()));
            }
            n += batch as u64;
            let c = l.open_checkpoint(&a.checkpoint).unwrap();
            assert_eq!((c.size, c.root), (n, mem.root(n)), "{backend:?}");
        }
        assert_eq!(l.root(n).await.unwrap(), mem.root(n));
        for (i, size) in [
            (0, 1),
            (0, n),
            (n - 1, n),
            (255, 256),
            (300, 513),
            (17, 100),
        ] {
            assert_eq!(
                l.inclusion_proof(i, size).await.unwrap(),
                mem.inclusion(i, size)
            );
        }
        for (m, size) in [(1, n), (256, n), (100, 300), (n, n), (0, 5)] {
            assert_eq!(
                l.consistency_proof(m, size).await.unwrap(),
                mem.consistency(m, size)
            );
        }
        assert!(l.inclusion_proof(n, n).await.is_err());
        assert!(l.consistency_proof(5, 4).await.is_err());
        // tiles: level 0 holds leaf hashes, level 1 the hashes of 256-leaf subtrees
        let t0 = l
            .tile(Tile {
                level: Some(0),
                index: 0,
                width: 256,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t0.len(), 256 * 32);
        assert_eq!(&t0[32 * 5..32 * 6], &mem.node((0, 5)).unwrap());
        let w = n % 256;
        let part = l
            .tile(Tile {
                level: Some(0),
                index: n / 256,
                width: w,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&part[..32], &mem.node((0, n / 256 * 256)).unwrap());
        let t1 = l
            .tile(Tile {
                level: Some(1),
                index: 0,
                width: (n / 256),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&t1[..32], &mem.node((8, 0)).unwrap());
        assert!(l
            .tile(Tile {
                level: Some(0),
                index: n / 256,
                width: w + 1
            })
            .await
            .unwrap()
            .is_none());
        let bundle = l
            .tile(Tile {
                level: None,
                index: 0,
                width: 3,
            })
            .await
            .unwrap()
            .unwrap();
        let first = entry(0);
        assert_eq!(&bundle[..2], &(first.len() as u16).to_be_bytes());
        assert_eq!(&bundle[2..2 + first.len()], first.as_bytes());
        // a proof of an entry against the latest checkpoint
        let p = parse_tlog_proof(&l.proof(10).await.unwrap()).unwrap();
        let c = l.open_checkpoint(&p.checkpoint).unwrap();
        verify_inclusion(
            &leaf_hash(entry(10).as_bytes()),
            10,
            c.size,
            &p.path,
            &c.root,
        )
        .unwrap();
        // an oversized entry is refused, nothing is written
        let big = "x".repeat(70_000);
        assert!(l.append(&[(big, "test")]).await.is_err());
        assert_eq!(l.store().ledger_size().await.unwrap(), n);
        let report = verify_log(&l, &l.verifier()).await.unwrap();
        assert_eq!(report.entries, n);
        assert_eq!(report.checkpoints, 8);
    }
}

#[tokio::test]
async fn appenders_in_parallel_take_turns_and_lose_nothing() {
    for (store, _dir) in stores("ledger_parallel").await {
        let l = ledger(store);
        let mut tasks = Vec::new();
        for t in 0..4u64 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..25u64 {
                    l.append(&[(entry(1000 * t + i), "test")]).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(l.store().ledger_size().await.unwrap(), 100);
        let report = verify_log(&l, &l.verifier()).await.unwrap();
        assert_eq!((report.entries, report.checkpoints), (100, 100));
    }
}

fn record(id: &str, tenant: &str, at: i64, tokens: i64) -> UsageRecord {
    UsageRecord {
        request_id: id.into(),
        tenant_id: tenant.into(),
        key_id: "key_1".into(),
        model: "m".into(),
        adapter: None,
        prompt_tokens: tokens,
        cached_tokens: 0,
        completion_tokens: 1,
        status: 200,
        latency_ms: 5,
        created_at_ms: at,
        cost_picodollars: 7,
        kind: UsageKind::Inference,
        slot_ms: 0,
    }
}

#[tokio::test]
async fn verify_log_names_a_changed_entry_a_truncation_and_a_changed_bill() {
    for (store, _dir) in stores("ledger_tamper").await {
        let l = ledger(store.clone());
        for i in 0..40 {
            l.append(&[(entry(i), "test")]).await.unwrap();
        }
        // usage: two tenants, two hours; a late record for an hour already committed gets an
        // entry of its own
        let h = 1_796_558_400_000i64;
        store
            .record_usage(&[
                record("r1", "ten_a", h + 10, 3),
                record("r2", "ten_a", h + 20, 4),
                record("r3", "ten_b", h + 30, 5),
                record("r4", "ten_a", h + 3_600_000 + 5, 6),
            ])
            .await
            .unwrap();
        assert_eq!(usage::commit_usage(&l, h + 3_600_000).await.unwrap(), 2);
        assert_eq!(usage::commit_usage(&l, h + 3_600_000).await.unwrap(), 0);
        store
            .record_usage(&[record("r5", "ten_a", h + 40, 1)])
            .await
            .unwrap();
        assert_eq!(usage::commit_usage(&l, h + 7_200_000).await.unwrap(), 2);
        let commits = store
            .ledger_usage_commits(Some("ten_a"), h, h + 3_600_000)
            .await
            .unwrap();
        assert_eq!(
            commits.iter().map(|c| c.records).collect::<Vec<_>>(),
            vec![2, 1]
        );
        let r = verify_log(&l, &l.verifier()).await.unwrap();
        assert_eq!((r.entries, r.usage_commits, r.usage_records), (44, 4, 5));

        // a record changed after its hour was committed
        execute(
            &store,
            "UPDATE usage_records SET prompt_tokens = 30 WHERE request_id = 'r2'",
        )
        .await
        .unwrap();
        let e = verify_log(&l, &l.verifier()).await.unwrap_err().to_string();
        assert!(
            e.contains("usage records of tenant ten_a") && e.contains("no longer match"),
            "{e}"
        );
        execute(
            &store,
            "UPDATE usage_records SET prompt_tokens = 4 WHERE request_id = 'r2'",
        )
        .await
        .unwrap();
        verify_log(&l, &l.verifier()).await.unwrap();

        // one byte of a stored entry
        execute(
            &store,
            "UPDATE ledger_entries SET body = REPLACE(body, '\"n\":7', '\"n\":8') WHERE idx = 7",
        )
        .await
        .unwrap();
        let e = verify_log(&l, &l.verifier()).await.unwrap_err().to_string();
        assert!(e.contains("entry 7 was changed"), "{e}");
        execute(
            &store,
            "UPDATE ledger_entries SET body = REPLACE(body, '\"n\":8', '\"n\":7') WHERE idx = 7",
        )
        .await
        .unwrap();
        verify_log(&l, &l.verifier()).await.unwrap();

        // the log truncated
        execute(&store, "DELETE FROM ledger_entries WHERE idx >= 30")
            .await
            .unwrap();
        let e = verify_log(&l, &l.verifier()).await.unwrap_err().to_string();
        assert!(e.contains("truncated") || e.contains("missing"), "{e}");

        // a checkpoint signed by another key is refused
        let other = ledger(store.clone());
        let e = verify_log(&other, &other.verifier())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("signature") || e.contains("no signature"), "{e}");
    }
}

#[tokio::test]
async fn a_rewritten_history_fails_consistency_with_earlier_checkpoints() {
    for (store, _dir) in stores("ledger_rewrite").await {
        let l = ledger(store.clone());
        for i in 0..10 {
            l.append(&[(entry(i), "test")]).await.unwrap();
        }
        let old = store.ledger_checkpoint(Some(5)).await.unwrap().unwrap().1;
        // the operator rewrites from entry 3 on with its own key (a consistent-looking new log)
        execute(&store, "DELETE FROM ledger_entries WHERE idx >= 3")
            .await
            .unwrap();
        execute(&store, "DELETE FROM ledger_hashes WHERE idx >= 0 AND NOT (level = 0 AND idx < 3) AND NOT (level = 1 AND idx < 1)")
            .await
            .unwrap();
        execute(&store, "DELETE FROM ledger_checkpoints WHERE size >= 3")
            .await
            .unwrap();
        execute(&store, "UPDATE ledger_head SET size = 3")
            .await
            .unwrap();
        for i in 0..7 {
            l.append(&[(format!("{{\"rewritten\":{i}}}"), "test")])
                .await
                .unwrap();
        }
        verify_log(&l, &l.verifier()).await.unwrap();
        // a party who kept the old checkpoint of size 5 sees the rewrite
        let c_old = l.open_checkpoint(&old).unwrap();
        let now = l.open_checkpoint(&l.checkpoint().await.unwrap()).unwrap();
        let proof = l.consistency_proof(5, now.size).await.unwrap();
        assert!(verify_consistency(5, now.size, &proof, &c_old.root, &now.root).is_err());
        let n = Note::parse(&old).unwrap();
        assert_eq!(n.sigs.len(), 1);
    }
}

#[tokio::test]
async fn an_artifact_verifies_back_to_its_raw_inputs_and_names_what_changed() {
    let (store, dir) = stores("ledger_artifacts").await.remove(0);
    let dir = dir.unwrap();
    let l = ledger(store);
    let raw = dir.path().join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    std::fs::write(raw.join("a.txt"), "raw data\n").unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("shards")).unwrap();
    std::fs::write(data.join("shards/0.bin"), [1u8, 2, 3]).unwrap();
    std::fs::write(data.join("manifest.json"), "{}").unwrap();
    let run = |deps| Run {
        build_type: "https://fount.dev/data/v1".into(),
        external: serde_json::json!({}),
        internal: serde_json::json!({}),
        dependencies: deps,
        invocation_id: None,
        started_on: "2026-12-06T12:00:00.000Z".into(),
        finished_on: "2026-12-06T12:00:01.000Z".into(),
    };
    let deps = dependencies(std::slice::from_ref(&raw)).unwrap();
    record_artifact(&l, &data, &[], "dataset", SLSA_PROVENANCE, slsa(&run(deps)))
        .await
        .unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("weights"), [9u8; 100]).unwrap();
    let deps = dependencies(&[data.join("shards")]).unwrap();
    let idx = record_artifact(
        &l,
        &model,
        &[],
        "training",
        SLSA_PROVENANCE,
        slsa(&run(deps)),
    )
    .await
    .unwrap();
    assert_eq!(idx, 1);
    let report = verify_artifact(&model, &l.verifier()).unwrap();
    assert_eq!(report.artifacts.len(), 2);
    assert_eq!(report.raw_inputs.len(), 1);

    // one byte of the raw data
    std::fs::write(raw.join("a.txt"), "raw dada\n").unwrap();
    let e = verify_artifact(&model, &l.verifier())
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.txt: its sha256 is"), "{e}");
    std::fs::write(raw.join("a.txt"), "raw data\n").unwrap();
    // one byte of the model
    std::fs::write(model.join("weights"), [8u8; 100]).unwrap();
    let e = verify_artifact(&model, &l.verifier())
        .unwrap_err()
        .to_string();
    assert!(e.contains("weights: its sha256 is"), "{e}");
    std::fs::write(model.join("weights"), [9u8; 100]).unwrap();
    // a file slipped in
    std::fs::write(data.join("shards/1.bin"), [0u8]).unwrap();
    let e = verify_artifact(&model, &l.verifier())
        .unwrap_err()
        .to_string();
    assert!(e.contains("shards/1.bin: not in entry 0"), "{e}");
    std::fs::remove_file(data.join("shards/1.bin")).unwrap();
    // the statement edited in provenance.json
    let p = model.join("provenance.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("fount.dev/data/v1", "fount.dev/data/v2")).unwrap();
    let e = verify_artifact(&model, &l.verifier())
        .unwrap_err()
        .to_string();
    assert!(e.contains("differs from the entry"), "{e}");
    std::fs::write(&p, &text).unwrap();
    // another log's key
    let other = Signer::generate("test.example/ledger", ED25519).unwrap();
    let e = verify_artifact(&model, &other.verifier())
        .unwrap_err()
        .to_string();
    assert!(e.contains("signature"), "{e}");
    verify_artifact(&model, &l.verifier()).unwrap();
    let _ = unhex;
}

#[tokio::test]
async fn each_hour_of_the_audit_trail_is_committed_and_a_changed_record_is_named() {
    for (store, _dir) in stores("ledger_audit").await {
        let b = store.backend();
        let l = ledger(store.clone());
        let h = 1_796_558_400_000i64;
        let rec = |id: &str, at: i64, action: &str| fount_store::AuditRecord {
            id: id.into(),
            created_at_ms: at,
            tenant_id: Some("ten_a".into()),
            key_id: Some("key_1".into()),
            request_id: Some(format!("chatcmpl-{id}")),
            stage: "input".into(),
            action: action.into(),
            categories: "[\"hate\"]".into(),
            rules: "[\"hate#1\"]".into(),
            policy: "t:ten_a".into(),
            content_sha256: "ab".repeat(32),
            content: None,
        };
        store
            .record_audit(&[
                rec("a1", h + 5, "block"),
                rec("a2", h + 9, "log"),
                rec("a3", h + 3_600_000 + 1, "block"),
            ])
            .await
            .unwrap();
        // the hour that is over, then (late) the next one
        assert_eq!(
            fount_ledger::audit::commit_audit(&l, h + 3_600_000)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            fount_ledger::audit::commit_audit(&l, h + 3_600_000)
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            fount_ledger::audit::commit_audit(&l, h + 7_200_000)
                .await
                .unwrap(),
            1
        );
        let entries = store.ledger_entries_of_kind("audit").await.unwrap();
        assert_eq!(entries.len(), 2, "{b:?}");
        let first = l.entry(entries[0]).await.unwrap();
        let st: serde_json::Value = serde_json::from_str(&first.body).unwrap();
        assert_eq!(st["predicate"]["records"], 2);
        assert_eq!(st["predicate"]["actions"]["input/block"], 1);
        assert_eq!(st["subject"][0]["name"], format!("audit/{h}"));
        let r = verify_log(&l, &l.verifier()).await.unwrap();
        assert_eq!((r.audit_commits, r.audit_records), (2, 3), "{b:?}");

        // a decision rewritten after its hour was committed
        execute(
            &store,
            "UPDATE audit_records SET action = 'allow' WHERE id = 'a1'",
        )
        .await
        .unwrap();
        let e = verify_log(&l, &l.verifier()).await.unwrap_err().to_string();
        assert!(
            e.contains("audit records committed in entry") && e.contains("no longer match"),
            "{b:?}: {e}"
        );
        execute(
            &store,
            "UPDATE audit_records SET action = 'block' WHERE id = 'a1'",
        )
        .await
        .unwrap();
        verify_log(&l, &l.verifier()).await.unwrap();
        // and one removed
        execute(&store, "DELETE FROM audit_records WHERE id = 'a3'")
            .await
            .unwrap();
        let e = verify_log(&l, &l.verifier()).await.unwrap_err().to_string();
        assert!(e.contains("0 records now"), "{b:?}: {e}");
    }
}
