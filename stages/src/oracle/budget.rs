//! [`Budget`]: money spent and reserved against `max_cost_usd`, shared by a stage's
//! concurrent requests. A request reserves its worst-case cost before it is sent, so
//! the limit is never crossed; what a fingerprint has spent is kept in its checkpoint
//! dir, so an interrupted and resumed stage counts it too.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Ask, AskError, Prices};
use crate::contract::StageError;

/// Spending so far and the hard limit; shared by concurrent requests. A request
/// reserves its worst-case cost before it is sent.
#[derive(Debug)]
pub struct Budget {
    limit: Option<f64>,
    prices: Prices,
    state: Mutex<(f64, f64)>,
}

impl Budget {
    /// A budget with `spent` already used.
    pub fn new(limit: Option<f64>, prices: Prices, spent: f64) -> Budget {
        Budget {
            limit,
            prices,
            state: Mutex::new((spent, 0.0)),
        }
    }

    /// Worst-case cost of an ask: prompt tokens estimated at one per 3 bytes (generous
    /// for BPE tokenisers) plus every allowed new token.
    pub fn worst_case(&self, ask: &Ask) -> f64 {
        let bytes: usize = ask.messages.iter().map(|m| m.content.len() + 8).sum();
        self.prices
            .cost(bytes.div_ceil(3) + 8, ask.sampling.max_new_tokens)
    }

    /// Reserves `amount`, or says why not.
    pub fn reserve(&self, amount: f64) -> Result<(), AskError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(limit) = self.limit {
            if s.0 + s.1 + amount > limit {
                return Err(AskError::Budget(format!(
                    "max_cost_usd {limit} reached: ${:.4} spent, ${:.4} in flight, the next request could cost ${amount:.4}",
                    s.0, s.1
                )));
            }
        }
        s.1 += amount;
        Ok(())
    }

    /// Releases a reservation and books the actual cost.
    pub fn settle(&self, reserved: f64, actual: f64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = (s.1 - reserved).max(0.0);
        s.0 += actual;
    }

    /// Money spent so far.
    pub fn spent(&self) -> f64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// The prices.
    pub fn prices(&self) -> &Prices {
        &self.prices
    }
}

/// Reads and writes the money already spent by a stage's fingerprint (kept in its
/// checkpoint dir, so `max_cost_usd` covers interrupted attempts too).
pub fn spent_so_far(checkpoint_dir: &Path) -> f64 {
    std::fs::read_to_string(spent_path(checkpoint_dir))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Saves the money spent.
pub fn save_spent(checkpoint_dir: &Path, spent: f64) -> Result<(), StageError> {
    std::fs::create_dir_all(checkpoint_dir)
        .map_err(StageError::io("creating the checkpoint dir"))?;
    crate::fsio::write_atomic(&spent_path(checkpoint_dir), format!("{spent}\n").as_bytes())
        .map_err(StageError::io("saving the money spent"))
}

fn spent_path(dir: &Path) -> PathBuf {
    dir.join("oracle_spent_usd")
}
