//! Token shards and the resumable sampler.

use fount_data::shard::{Sampler, Shard, ShardSet, ShardWriter, MAGIC};

fn docs() -> Vec<Vec<u32>> {
    (0..50u32)
        .map(|i| (0..(i % 7 + 1)).map(|k| i * 10 + k).collect())
        .collect()
}

#[test]
fn documents_in_equal_documents_out() {
    let dir = tempfile::tempdir().unwrap();
    // tiny shards force several files and documents on both sides of boundaries
    let mut w = ShardWriter::new(dir.path(), "train", 1000, 999, 40).unwrap();
    for d in docs() {
        w.push(&d).unwrap();
    }
    let files = w.finish().unwrap();
    assert!(files.len() > 3);
    let set = ShardSet::open(dir.path(), "train").unwrap();
    assert_eq!(set.num_docs(), 50);
    let mut got = Vec::new();
    for s in set.shards() {
        assert_eq!(s.eos, 999);
        for i in 0..s.num_docs() {
            let mut d = s.doc(i).unwrap();
            assert_eq!(d.pop(), Some(999), "every document ends with EOS");
            got.push(d);
        }
        assert!(s.doc(s.num_docs()).is_none());
    }
    assert_eq!(got, docs());
    // the stream is the documents with EOS, in order
    let mut stream = Vec::new();
    set.read(0, set.num_tokens(), &mut stream);
    let want: Vec<u32> = docs()
        .into_iter()
        .flat_map(|mut d| {
            d.push(999);
            d
        })
        .collect();
    assert_eq!(stream, want);
}

#[test]
fn wide_vocabularies_use_u32() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(dir.path(), "train", 200_000, 0, 1 << 20).unwrap();
    w.push(&[150_000, 7]).unwrap();
    w.finish().unwrap();
    let bytes = std::fs::read(dir.path().join("train-00000.bin")).unwrap();
    assert_eq!(&bytes[..8], MAGIC);
    assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 4);
    let s = Shard::open(&dir.path().join("train-00000.bin")).unwrap();
    assert_eq!(s.doc(0).unwrap(), vec![150_000, 7, 0]);
    // and ids beyond the vocabulary are refused
    let mut w = ShardWriter::new(dir.path(), "x", 100, 0, 1 << 20).unwrap();
    assert!(w.push(&[100]).is_err());
}

#[test]
fn corrupt_shards_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(dir.path(), "train", 1000, 1, 1 << 20).unwrap();
    w.push(&[5, 6, 7]).unwrap();
    w.finish().unwrap();
    let path = dir.path().join("train-00000.bin");
    let good = std::fs::read(&path).unwrap();
    let bad_path = dir.path().join("bad.bin");
    std::fs::write(&bad_path, &good[..good.len() - 3]).unwrap();
    let e = Shard::open(&bad_path).unwrap_err().to_string();
    assert!(
        e.contains("not a fount token shard") && e.contains("bytes"),
        "{e}"
    );
    let mut wrong = good.clone();
    wrong[0] = b'X';
    std::fs::write(&bad_path, &wrong).unwrap();
    assert!(Shard::open(&bad_path)
        .unwrap_err()
        .to_string()
        .contains("magic"));
    assert!(ShardSet::open(dir.path(), "validation")
        .unwrap_err()
        .to_string()
        .contains("no validation-"));
}

#[test]
fn sampling_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardWriter::new(dir.path(), "train", 1000, 999, 64).unwrap();
    for d in docs() {
        w.push(&d).unwrap();
    }
    w.finish().unwrap();
    let set = ShardSet::open(dir.path(), "train").unwrap();
    let mut a = Sampler::new(&set, 8, 42).unwrap();
    let per_epoch = a.windows_per_epoch();
    let mut first = Vec::new();
    let mut buf = Vec::new();
    // run past an epoch boundary
    for _ in 0..per_epoch + 5 {
        a.next_window(&mut buf);
        assert_eq!(buf.len(), 9);
        first.push(buf.clone());
    }
    // every window of an epoch is visited once
    let mut starts: Vec<_> = first[..per_epoch].iter().map(|w| w[0]).collect();
    starts.sort_unstable();
    starts.dedup();
    assert!(starts.len() > per_epoch / 2);
    // save mid-way, restore, continue: identical
    let mut b = Sampler::new(&set, 8, 42).unwrap();
    for _ in 0..per_epoch - 2 {
        b.next_window(&mut buf);
    }
    let saved = serde_json::to_string(&b.state()).unwrap();
    drop(b);
    let mut c = Sampler::restore(&set, serde_json::from_str(&saved).unwrap()).unwrap();
    for want in &first[per_epoch - 2..] {
        c.next_window(&mut buf);
        assert_eq!(&buf, want);
    }
    // another seed gives another order; a position from other shards is refused
    let mut d = Sampler::new(&set, 8, 43).unwrap();
    d.next_window(&mut buf);
    let mut other = a.state();
    other.total_tokens += 1;
    assert!(Sampler::restore(&set, other).is_err());
}
