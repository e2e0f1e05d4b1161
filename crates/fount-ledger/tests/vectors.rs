//! Against references: RFC 6962's test roots, proofs computed by Go's `sumdb/tlog`
//! (`tools/ledger/vectors`), and Go `sumdb/note`'s signed-note vector.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use fount_ledger::merkle::{
    empty_root, leaf_hash, verify_consistency, verify_inclusion, Hash, MemoryTree,
};
use fount_ledger::note::{Note, Signer, Verifier};
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_str(include_str!("golden/tlog_vectors.json")).unwrap()
}

fn h(s: &Value) -> Hash {
    B64.decode(s.as_str().unwrap()).unwrap().try_into().unwrap()
}

fn tree(v: &Value) -> MemoryTree {
    let mut t = MemoryTree::new();
    for l in v["leaves"].as_array().unwrap() {
        let bytes: Vec<u8> = (0..l.as_str().unwrap().len() / 2)
            .map(|i| u8::from_str_radix(&l.as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        t.push(leaf_hash(&bytes));
    }
    t
}

#[test]
fn roots_match_rfc6962_test_vectors() {
    // certificate-transparency's merkle_tree_test: the roots of the first 1..8 test leaves
    let want = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    let t = tree(&vectors());
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            fount_ledger::statement::hex(&t.root(i as u64 + 1)),
            *w,
            "size {}",
            i + 1
        );
    }
    assert_eq!(
        fount_ledger::statement::hex(&empty_root()),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn roots_and_proofs_equal_go_sumdb_tlog() {
    let v = vectors();
    let t = tree(&v);
    // Go's TreeHash(0) is the zero hash; RFC 6962's empty root is tested above
    for (size, root) in v["roots"].as_array().unwrap().iter().enumerate().skip(1) {
        assert_eq!(t.root(size as u64), h(root), "root of {size}");
    }
    let incl = v["inclusion"].as_array().unwrap();
    assert!(incl.len() > 250);
    for c in incl {
        let (i, n) = (c["index"].as_u64().unwrap(), c["size"].as_u64().unwrap());
        let want: Vec<Hash> = c["proof"].as_array().unwrap().iter().map(h).collect();
        assert_eq!(t.inclusion(i, n), want, "inclusion of {i} in {n}");
        let leaf = t.node((0, i)).unwrap();
        verify_inclusion(&leaf, i, n, &want, &t.root(n)).unwrap();
    }
    let cons = v["consistency"].as_array().unwrap();
    assert!(cons.len() > 250);
    for c in cons {
        let (m, n) = (c["old"].as_u64().unwrap(), c["new"].as_u64().unwrap());
        let want: Vec<Hash> = c["proof"].as_array().unwrap().iter().map(h).collect();
        assert_eq!(t.consistency(m, n), want, "consistency {m} -> {n}");
        verify_consistency(m, n, &want, &t.root(m), &t.root(n)).unwrap();
    }
}

#[test]
fn notes_sign_and_verify_as_go_sumdb_note_does() {
    // golang.org/x/mod/sumdb/note's test key and its signed note
    let skey = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz";
    let vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
    let text = "If you think cryptography is the answer to your problem,\n\
                then you don't know what your problem is.\n";
    let want = format!(
        "{text}\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
    );
    let signer = Signer::parse(skey).unwrap();
    assert_eq!(signer.verifier_key(), vkey);
    assert_eq!(signer.sign(text).unwrap(), want);
    assert_eq!(signer.private_key(), skey);
    let v = Verifier::parse(vkey).unwrap();
    let note = Note::parse(&want).unwrap();
    note.verify_by(&v).unwrap();
    // a changed text fails; an unknown key's line is ignored, not an error
    let forged = want.replace("cryptography", "cryptografy");
    assert!(Note::parse(&forged).unwrap().verify_by(&v).is_err());
    let other = Signer::generate("someone.else", 1).unwrap();
    assert!(Note::parse(&want)
        .unwrap()
        .verify(&[other.verifier()])
        .unwrap()
        .is_empty());
    // malformed keys and notes are refused
    for bad in [
        "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "PeterNeumann+c74f20a3+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        "nothing",
    ] {
        assert!(Verifier::parse(bad).is_err(), "{bad}");
    }
    for bad in [text, "no newline", "a\n\n— x AAAA\n"] {
        assert!(Note::parse(bad).is_err(), "{bad:?}");
    }
}
