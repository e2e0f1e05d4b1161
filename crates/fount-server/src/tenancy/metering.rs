//! One request's metering: the meter the engine counts its tokens into, what the handler tells
//! it (the status answered, the quota reservation, the adapter), and the commit of its usage
//! record.
//!
//! The record is exact by construction: [`RequestMeter`]'s final callback runs once nothing can
//! count any more, settles the reservation, prices the tokens and hands the record to the
//! writer; [`Metering::finish`] waits for the commit, so a response a client saw complete is on
//! disk.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fount_engine::RequestMeter;
use fount_store::{now_ms, UsageRecord};
use tokio::sync::oneshot;

use super::{Caller, Reservation, Tenancy};
use crate::error::{ApiError, ApiResult};

/// A metered request: the meter the engine counts in, what its record will say, and the commit
/// of that record.
#[derive(Debug)]
pub struct Metering {
    request_id: String,
    meter: Arc<RequestMeter>,
    cell: Arc<Cell>,
    ack: oneshot::Receiver<()>,
}

/// What the handler tells the meter's final callback.
#[derive(Debug)]
struct Cell {
    /// The HTTP status answered (499 when the client went away).
    status: AtomicU16,
    /// The quota reservation to settle.
    reservation: Mutex<Option<Reservation>>,
    /// The adapter the model resolved to.
    adapter: Mutex<Option<String>>,
}

impl Metering {
    /// The request's id (its usage record's).
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The meter every engine request of this request counts in.
    pub fn meter(&self) -> &Arc<RequestMeter> {
        &self.meter
    }

    /// Ties the quota reservation and the adapter used to the record.
    pub(super) fn hold(&self, reservation: Reservation, adapter: Option<String>) {
        if let Ok(mut slot) = self.cell.reservation.lock() {
            *slot = Some(reservation);
        }
        if let Ok(mut a) = self.cell.adapter.lock() {
            *a = adapter;
        }
    }

    /// Records the client as gone (status 499) with the tokens generated until the engine saw
    /// the stream dropped.
    pub fn abandoned(&self) {
        self.cell.status.store(499, Ordering::SeqCst);
    }

    /// Records `status` and waits until the record is committed (the engine lets go of a
    /// finished request within a step).
    pub async fn finish(self, status: u16) {
        self.cell.status.store(status, Ordering::SeqCst);
        drop(self.meter);
        let _ = self.ack.await;
    }

    /// Records an error's status (and waits for the record) before answering it.
    pub async fn fail<T>(metering: Option<Metering>, e: ApiError) -> ApiResult<T> {
        if let Some(m) = metering {
            m.finish(e.status().as_u16()).await;
        }
        Err(e)
    }
}

impl Tenancy {
    /// A meter for one request: when its final callback runs, the reservation (if any) is
    /// settled and the usage record, priced at `model`'s price (or `base`'s), goes to the
    /// writer.
    pub fn meter(
        self: &Arc<Self>,
        caller: &Caller,
        request_id: &str,
        model: &str,
        base: &str,
        adapter: Option<String>,
    ) -> Metering {
        let (ack_tx, ack_rx) = oneshot::channel();
        let metered = Arc::new(Cell {
            status: AtomicU16::new(200),
            reservation: Mutex::new(None),
            adapter: Mutex::new(adapter),
        });
        let (tenancy, cell) = (self.clone(), metered.clone());
        let (tenant_id, key_id) = (caller.tenant.id.clone(), caller.key.id.clone());
        let (request_id, model, base) =
            (request_id.to_string(), model.to_string(), base.to_string());
        let record_id = request_id.clone();
        let start = Instant::now();
        let created_at_ms = now_ms();
        let meter = RequestMeter::on_final(move |m| {
            let (prompt, cached, completion) = m.counts();
            let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            if let Some(r) = cell.reservation.lock().ok().and_then(|mut r| r.take()) {
                tenancy.settle(&r, to_i64(prompt + completion));
            }
            let adapter = cell.adapter.lock().ok().and_then(|mut a| a.take());
            let (prompt, cached, completion) = (to_i64(prompt), to_i64(cached), to_i64(completion));
            let cost = tenancy
                .price(&model, &base)
                .cost(prompt, cached, completion);
            let record = UsageRecord {
                request_id,
                tenant_id,
                key_id,
                model,
                adapter,
                prompt_tokens: prompt,
                cached_tokens: cached,
                completion_tokens: completion,
                status: i64::from(cell.status.load(Ordering::SeqCst)),
                latency_ms: i64::try_from(start.elapsed().as_millis()).unwrap_or(i64::MAX),
                created_at_ms,
                cost_picodollars: cost,
                kind: fount_store::UsageKind::Inference,
                slot_ms: 0,
            };
            if let Some(f) = tenancy.on_record.get() {
                f(&record);
            }
            tenancy.backlog.fetch_add(1, Ordering::SeqCst);
            if tenancy.writer.send((Some(record), Some(ack_tx))).is_err() {
                tenancy.backlog.fetch_sub(1, Ordering::SeqCst);
            }
        });
        Metering {
            request_id: record_id,
            meter,
            cell: metered,
            ack: ack_rx,
        }
    }
}
