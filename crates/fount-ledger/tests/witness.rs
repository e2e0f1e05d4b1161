//! The witness: cosigns consistent checkpoints, refuses everything else with tlog-witness's
//! status codes.

use fount_ledger::checkpoint::Checkpoint;
use fount_ledger::merkle::{leaf_hash, MemoryTree};
use fount_ledger::note::{Note, Signer, Verifier, COSIGNATURE, ED25519};
use fount_ledger::witness::{add_checkpoint_body, check_cosignatures, Witness};

fn checkpoint(log: &Signer, t: &MemoryTree, size: u64) -> String {
    let body = Checkpoint {
        origin: log.name().into(),
        size,
        root: t.root(size),
        extensions: vec![],
    }
    .text();
    log.sign(&body).unwrap()
}

#[test]
fn a_witness_cosigns_only_consistent_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let log = Signer::generate("test.example/log", ED25519).unwrap();
    let w = Witness::open(
        dir.path(),
        Some("test.example/witness"),
        vec![log.verifier()],
    )
    .unwrap();
    let wkey = Verifier::parse(&w.verifier_key()).unwrap();
    assert!(wkey.is_cosigner());
    let mut t = MemoryTree::new();
    for i in 0..20u32 {
        t.push(leaf_hash(&i.to_be_bytes()));
    }
    // first contact: old 0, no proof
    let c10 = checkpoint(&log, &t, 10);
    let sig = w
        .add_checkpoint(&add_checkpoint_body(0, &[], &c10), 1_800_000_000)
        .unwrap();
    let lines = check_cosignatures(&c10, &sig, &wkey).unwrap();
    let cosigned = Note::parse(&c10).unwrap().with_signatures(&lines);
    let ok = Note::parse(&cosigned)
        .unwrap()
        .verify(&[log.verifier(), wkey.clone()])
        .unwrap();
    assert_eq!(ok.len(), 2);
    assert_eq!(ok[1].1, Some(1_800_000_000));
    // a stale old size: 409 with the witness's size
    let c20 = checkpoint(&log, &t, 20);
    let r = w
        .add_checkpoint(&add_checkpoint_body(0, &[], &c20), 1)
        .unwrap_err();
    assert_eq!((r.status, r.body.as_str()), (409, "10\n"));
    // a consistent extension is cosigned
    let proof = t.consistency(10, 20);
    w.add_checkpoint(&add_checkpoint_body(10, &proof, &c20), 2)
        .unwrap();
    assert_eq!(w.cosigned_size("test.example/log"), Some(20));
    // a rewritten history: same size 20 with another root, or 25 not extending 20
    let mut forged = MemoryTree::new();
    for i in 0..25u32 {
        forged.push(leaf_hash(&(i + 1).to_be_bytes()));
    }
    let f20 = checkpoint(&log, &forged, 20);
    let r = w
        .add_checkpoint(&add_checkpoint_body(20, &[], &f20), 3)
        .unwrap_err();
    assert_eq!(r.status, 422);
    let f25 = checkpoint(&log, &forged, 25);
    let r = w
        .add_checkpoint(
            &add_checkpoint_body(20, &forged.consistency(20, 25), &f25),
            3,
        )
        .unwrap_err();
    assert_eq!(r.status, 422, "{}", r.body);
    // unknown log: 404; a signature by another key: 403; shrinking: 400; garbage: 400
    let stranger = Signer::generate("other.example/log", ED25519).unwrap();
    let r = w
        .add_checkpoint(
            &add_checkpoint_body(0, &[], &checkpoint(&stranger, &t, 3)),
            1,
        )
        .unwrap_err();
    assert_eq!(r.status, 404);
    let impostor = Signer::generate("test.example/log", ED25519).unwrap();
    let r = w
        .add_checkpoint(
            &add_checkpoint_body(20, &[], &checkpoint(&impostor, &t, 20)),
            1,
        )
        .unwrap_err();
    assert_eq!(r.status, 403);
    let r = w
        .add_checkpoint(&add_checkpoint_body(30, &[], &c20), 1)
        .unwrap_err();
    assert_eq!(r.status, 400);
    assert_eq!(w.add_checkpoint("old x\n\n", 1).unwrap_err().status, 400);
    // the state survives a restart
    drop(w);
    let w = Witness::open(dir.path(), None, vec![log.verifier()]).unwrap();
    assert_eq!(w.cosigned_size("test.example/log"), Some(20));
    assert_eq!(w.verifier_key(), wkey.to_key());
    let _ = COSIGNATURE;
}
