//! The price table, read from the store at most once a second.

use std::time::Instant;

use fount_store::Price;

use super::{Tenancy, QUOTA_TTL};
use crate::error::ApiError;

impl Tenancy {
    /// Refreshes the price table when it is older than a second.
    pub(super) async fn refresh_prices(&self) -> Result<(), ApiError> {
        let fresh = self
            .prices
            .lock()
            .is_ok_and(|p| p.0.is_some_and(|at| at.elapsed() < QUOTA_TTL));
        if fresh {
            return Ok(());
        }
        let prices = self
            .store
            .prices()
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Ok(mut p) = self.prices.lock() {
            *p = (Some(Instant::now()), prices.into_iter().collect());
        }
        Ok(())
    }

    /// The price of `model`, else of `base` (an adapter without a price of its own costs what
    /// its base model does), else nothing.
    pub(super) fn price(&self, model: &str, base: &str) -> Price {
        self.prices.lock().map_or(Price::default(), |p| {
            p.1.get(model)
                .or_else(|| p.1.get(base))
                .copied()
                .unwrap_or_default()
        })
    }
}
