//! Admission against quotas every replica on one PostgreSQL shares. Requests of one tenant and
//! key that wait at once are admitted in one transaction ([`fount_store::Store::admit_batch`]):
//! while a transaction for the pair runs, new requests queue, and the next transaction takes
//! them all. A tenant's admissions are serialised by its lock across replicas, so batching is
//! what lets a busy tenant's requests through at the rate of the HTTP layer rather than one
//! database round trip sequence each, and every verdict is still exact.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use fount_store::{Admission, Quota, Store};
use tokio::sync::oneshot;

use super::quota::{check, wants};
use crate::error::ApiError;

/// A request waiting for its admission.
#[derive(Debug)]
pub(super) struct Waiting {
    pub request_id: String,
    pub model: String,
    pub tokens: i64,
    pub now_ms: i64,
    /// The tenant's and the key's quotas.
    pub quotas: [Quota; 2],
    pub reply: oneshot::Sender<Result<(), ApiError>>,
}

/// Requests waiting, by `(tenant id, key id)`; a pair is present while its admissions run.
#[derive(Debug, Default)]
pub(super) struct Queues(Mutex<HashMap<(String, String), Vec<Waiting>>>);

/// Queues `w` for admission as replica `replica`; its verdict comes on its reply channel.
pub(super) fn enqueue(
    queues: &Arc<Queues>,
    store: &Store,
    replica: &str,
    pair: (String, String),
    w: Waiting,
) {
    let start = {
        let Ok(mut q) = queues.0.lock() else {
            let _ = w
                .reply
                .send(Err(ApiError::Internal("admission queue poisoned".into())));
            return;
        };
        match q.get_mut(&pair) {
            Some(waiting) => {
                waiting.push(w);
                false
            }
            None => {
                q.insert(pair.clone(), vec![w]);
                true
            }
        }
    };
    if start {
        let (queues, store, replica) = (queues.clone(), store.clone(), replica.to_string());
        tokio::spawn(async move { drain(queues, store, replica, pair).await });
    }
}

/// Admits the pair's waiting requests, a transaction at a time, until none waits.
async fn drain(queues: Arc<Queues>, store: Store, replica: String, pair: (String, String)) {
    loop {
        let batch = {
            let Ok(mut q) = queues.0.lock() else { return };
            match q.get_mut(&pair) {
                Some(w) if !w.is_empty() => std::mem::take(w),
                _ => {
                    q.remove(&pair);
                    return;
                }
            }
        };
        let admissions: Vec<Admission<'_>> = batch
            .iter()
            .map(|w| Admission {
                request_id: &w.request_id,
                replica_id: &replica,
                tenant_id: &pair.0,
                key_id: &pair.1,
                model: &w.model,
                tokens: w.tokens,
                now_ms: w.now_ms,
                wants: [wants(&w.quotas[0]), wants(&w.quotas[1])],
            })
            .collect();
        let verdicts = store
            .admit_batch(&admissions, |i, c| {
                let w = &batch[i];
                for ((c, q), whose) in c.iter().zip(&w.quotas).zip(["tenant's", "key's"]) {
                    check(c, q, w.now_ms, w.tokens, whose)?;
                }
                Ok::<(), ApiError>(())
            })
            .await;
        drop(admissions);
        match verdicts {
            Ok(v) => {
                for (w, v) in batch.into_iter().zip(v) {
                    let _ = w.reply.send(v);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "admitting requests against the shared quotas");
                for w in batch {
                    let _ = w.reply.send(Err(ApiError::Internal(e.to_string())));
                }
            }
        }
    }
}
