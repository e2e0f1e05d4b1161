//! `fount bench ledger`: batched appends against the store's plain batched inserts, proof sizes
//! and times at a large log against reading one entry, and the hourly usage commitment against
//! writing the records it covers.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use fount_ledger::merkle::{leaf_hash, verify_consistency, verify_inclusion};
use fount_ledger::note::{Signer, ED25519};
use fount_ledger::Ledger;
use fount_store::{Store, UsageKind, UsageRecord};
use rand::{Rng, SeedableRng};

/// Arguments of `fount bench ledger`.
#[derive(Debug, Args)]
pub struct LedgerBench {
    /// Entries appended in the append measurement.
    #[arg(long, default_value_t = 100_000)]
    pub entries: u64,
    /// Entries per append (one transaction, one signed checkpoint).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// The log is grown to this many entries before proofs are measured.
    #[arg(long, default_value_t = 1_000_000)]
    pub proof_entries: u64,
    /// Usage records committed in the billing measurement.
    #[arg(long, default_value_t = 100_000)]
    pub usage_records: usize,
    /// PostgreSQL instead of a scratch SQLite file.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Append only, into this data directory, printing `appended <size>` after each committed
    /// batch until `--entries` (what the crash test kills).
    #[arg(long, hide = true)]
    pub append_only: Option<PathBuf>,
}

/// A statement of the size of a small run's entry.
fn entry(i: u64) -> String {
    format!(
        "{{\"_type\":\"https://in-toto.io/Statement/v1\",\"subject\":[{{\"name\":\"bench/{i}\",\
         \"digest\":{{\"sha256\":\"{:064x}\"}}}}],\"predicateType\":\"https://fount.dev/ledger/admin/v1\",\
         \"predicate\":{{\"act\":\"bench\",\"details\":{{\"i\":{i}}},\"at_ms\":1796558400000}}}}",
        u128::from(i) * 0x9e37_79b9_7f4a_7c15
    )
}

fn record(i: usize) -> UsageRecord {
    UsageRecord {
        request_id: format!("chatcmpl-bench-{i}"),
        tenant_id: format!("ten_{}", i % 32),
        key_id: "key_bench".into(),
        model: "bench".into(),
        adapter: None,
        prompt_tokens: 100,
        cached_tokens: 0,
        completion_tokens: 20,
        status: 200,
        latency_ms: 50,
        created_at_ms: 1_796_558_400_000 + (i as i64 % 3_600_000),
        cost_picodollars: 1_000,
        kind: UsageKind::Inference,
        slot_ms: 0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn append_all(ledger: &Ledger, from: u64, to: u64, batch: usize, ack: bool) -> Result<()> {
    let mut next = from;
    while next < to {
        let n = (to - next).min(batch as u64);
        let rows: Vec<(String, &str)> = (next..next + n).map(|i| (entry(i), "bench")).collect();
        let a = ledger.append(&rows).await?;
        next = a.size;
        if ack {
            use std::io::Write;
            println!("appended {}", a.size);
            std::io::stdout().flush()?;
        }
    }
    Ok(())
}

/// Runs `fount bench ledger`.
pub fn run(a: LedgerBench) -> Result<()> {
    let rt = super::ledger::runtime()?;
    if let Some(dir) = &a.append_only {
        return rt.block_on(async {
            let ledger = super::ledger::open(dir, a.database_url.as_deref()).await?;
            let from = ledger.store().ledger_size().await?;
            append_all(&ledger, from, a.entries, a.batch, true).await
        });
    }
    let scratch = tempfile::tempdir()?;
    rt.block_on(async {
        let store = Store::open(scratch.path(), a.database_url.as_deref())
            .await
            .context("opening the store")?;
        let backend = format!("{:?}", store.backend());
        let start = store.ledger_size().await?;
        let ledger = Ledger::new(store.clone(), Signer::generate("bench.fount/ledger", ED25519)?);
        println!("fount bench ledger on {backend}, batches of {}", a.batch);

        // appends against the same rows written as plain batched inserts (usage records)
        let t = Instant::now();
        append_all(&ledger, start, start + a.entries, a.batch, false).await?;
        let append_s = t.elapsed().as_secs_f64();
        let recs: Vec<UsageRecord> = (0..a.entries as usize).map(record).collect();
        let t = Instant::now();
        for chunk in recs.chunks(a.batch) {
            store.record_usage(chunk).await?;
        }
        let insert_s = t.elapsed().as_secs_f64();
        let rate = a.entries as f64 / append_s;
        println!(
            "appends: {:.0} entries/s (hash, tree, sign, insert) vs {:.0} rows/s plain inserts: {:.2}x",
            rate,
            a.entries as f64 / insert_s,
            append_s / insert_s
        );

        // proofs at a large log, against reading one entry
        let size = ledger.store().ledger_size().await?;
        if size < a.proof_entries {
            let t = Instant::now();
            append_all(&ledger, size, a.proof_entries, a.batch.max(1000), false).await?;
            println!(
                "grew the log to {} entries in {:.0}s",
                a.proof_entries,
                t.elapsed().as_secs_f64()
            );
        }
        let n = ledger.store().ledger_size().await?;
        let c = ledger.open_checkpoint(&ledger.checkpoint().await?)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut incl, mut cons, mut read, mut verify) = (vec![], vec![], vec![], vec![]);
        let (mut incl_len, mut cons_len) = (0usize, 0usize);
        for _ in 0..200 {
            let i = rng.random_range(0..n);
            let t = Instant::now();
            let p = ledger.inclusion_proof(i, n).await?;
            incl.push(t.elapsed().as_secs_f64());
            incl_len = incl_len.max(p.len());
            let t = Instant::now();
            let e = ledger.entry(i).await?;
            read.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            verify_inclusion(&leaf_hash(e.body.as_bytes()), i, n, &p, &c.root)?;
            verify.push(t.elapsed().as_secs_f64());
            let m = rng.random_range(1..n);
            let t = Instant::now();
            let p = ledger.consistency_proof(m, n).await?;
            cons.push(t.elapsed().as_secs_f64());
            cons_len = cons_len.max(p.len());
            let root_m = ledger.root(m).await?;
            verify_consistency(m, n, &p, &root_m, &c.root)?;
        }
        let (mi, mc, mr, mv) = (median(incl), median(cons), median(read), median(verify));
        println!(
            "proofs at {n} entries: inclusion {} hashes ({} bytes) in {:.0} µs, consistency up to {} \
             hashes ({} bytes) in {:.0} µs; reading one entry {:.0} µs (inclusion {:.1}x a read); \
             verifying an inclusion proof {:.1} µs",
            incl_len,
            incl_len * 32,
            mi * 1e6,
            cons_len,
            cons_len * 32,
            mc * 1e6,
            mr * 1e6,
            mi / mr,
            mv * 1e6
        );

        // the hourly bill: committing records against writing them
        let recs: Vec<UsageRecord> = (0..a.usage_records)
            .map(|i| {
                let mut r = record(i);
                r.request_id = format!("chatcmpl-commit-{i}");
                r
            })
            .collect();
        let t = Instant::now();
        for chunk in recs.chunks(1000) {
            store.record_usage(chunk).await?;
        }
        let write_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        // everything not committed yet: these and the append measurement's rows
        let entries = fount_ledger::usage::commit_usage(&ledger, i64::MAX).await?;
        let commit_s = t.elapsed().as_secs_f64();
        let committed = a.usage_records + a.entries as usize;
        println!(
            "billing: {committed} records committed in {entries} entries in {:.2}s ({:.0} records/s); \
             writing {} records took {:.2}s; per request served: 0 (commitments are hourly, off the request path)",
            commit_s,
            committed as f64 / commit_s,
            a.usage_records,
            write_s
        );
        store.close().await;
        Ok(())
    })
}
