//! The decision matrix of a multi-dimensional scoring oracle (a filter's rubric),
//! measured on a stratified sample of on-topic, off-topic and edge-case items: an
//! oracle that scores off-topic items high (false positives), on-topic items low
//! (false negatives), or everything alike (no variance across items) is not fit to
//! label a corpus. The overall score of each item is the filter's
//! ([`crate::task::filter::Filter::assess`]), so the gate judges what the split and
//! the metrics will use.

use serde::{Deserialize, Serialize};

use crate::contract::Decision;

/// Thresholds (defaults: the distillation workflow's decision matrix). Rates are shares
/// of the stratum, in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreGate {
    /// An off-topic item at or above this overall score is a false positive.
    pub positive_at: f64,
    /// … and at or above this, a strong false positive.
    pub strong_positive_at: f64,
    /// An on-topic item below this overall score is a false negative.
    pub negative_below: f64,
    /// PASS needs the false-positive rate below this …
    pub pass_fp: f64,
    /// … the strong false-positive rate below this …
    pub pass_strong_fp: f64,
    /// … and the false-negative rate below this.
    pub pass_fn: f64,
    /// FAIL when the false-positive rate is above this (between: REVIEW).
    pub fail_fp: f64,
    /// FAIL when the false-negative rate is above this (between: REVIEW).
    pub fail_fn: f64,
    /// FAIL unless the mean per-dimension variance across items is above this.
    pub min_variance: f64,
}

impl Default for ScoreGate {
    fn default() -> Self {
        ScoreGate {
            positive_at: 5.0,
            strong_positive_at: 7.0,
            negative_below: 5.0,
            pass_fp: 0.10,
            pass_strong_fp: 0.05,
            pass_fn: 0.20,
            fail_fp: 0.20,
            fail_fn: 0.30,
            min_variance: 1.0,
        }
    }
}

/// What the gate measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreRates {
    /// Off-topic items scoring ≥ `positive_at`, as a share of the off-topic items.
    pub false_positive_rate: f64,
    /// Off-topic items scoring ≥ `strong_positive_at`.
    pub strong_false_positive_rate: f64,
    /// On-topic items scoring < `negative_below`, as a share of the on-topic items.
    pub false_negative_rate: f64,
    /// Mean over dimensions of the population variance of its scores across items.
    pub mean_dimension_variance: f64,
}

/// Rates from the overall scores of off-topic and on-topic items and every item's
/// per-dimension scores.
pub fn rates(off: &[f64], on: &[f64], scores: &[Vec<f64>], g: &ScoreGate) -> ScoreRates {
    let share = |xs: &[f64], f: &dyn Fn(f64) -> bool| {
        if xs.is_empty() {
            0.0
        } else {
            xs.iter().filter(|&&x| f(x)).count() as f64 / xs.len() as f64
        }
    };
    let dims = scores.first().map(Vec::len).unwrap_or(0);
    let n = scores.len().max(1) as f64;
    let var = (0..dims)
        .map(|d| {
            let m = scores.iter().map(|s| s[d]).sum::<f64>() / n;
            scores.iter().map(|s| (s[d] - m).powi(2)).sum::<f64>() / n
        })
        .sum::<f64>()
        / dims.max(1) as f64;
    ScoreRates {
        false_positive_rate: share(off, &|x| x >= g.positive_at),
        strong_false_positive_rate: share(off, &|x| x >= g.strong_positive_at),
        false_negative_rate: share(on, &|x| x < g.negative_below),
        mean_dimension_variance: var,
    }
}

/// PASS when every PASS condition holds, FAIL when any FAIL condition does, REVIEW
/// otherwise; one reason per condition missed.
pub fn decide(r: &ScoreRates, g: &ScoreGate) -> (Decision, Vec<String>) {
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let mut fail = Vec::new();
    if r.false_positive_rate > g.fail_fp {
        fail.push(format!(
            "false positives (off-topic scored ≥ {}): {} > {}",
            g.positive_at,
            pct(r.false_positive_rate),
            pct(g.fail_fp)
        ));
    }
    if r.false_negative_rate > g.fail_fn {
        fail.push(format!(
            "false negatives (on-topic scored < {}): {} > {}",
            g.negative_below,
            pct(r.false_negative_rate),
            pct(g.fail_fn)
        ));
    }
    if r.mean_dimension_variance <= g.min_variance {
        fail.push(format!(
            "the oracle does not discriminate: mean per-dimension variance {:.3} ≤ {}",
            r.mean_dimension_variance, g.min_variance
        ));
    }
    if !fail.is_empty() {
        return (Decision::Fail, fail);
    }
    let mut review = Vec::new();
    if r.false_positive_rate >= g.pass_fp {
        review.push(format!(
            "false positives {} ≥ {}",
            pct(r.false_positive_rate),
            pct(g.pass_fp)
        ));
    }
    if r.strong_false_positive_rate >= g.pass_strong_fp {
        review.push(format!(
            "strong false positives (off-topic scored ≥ {}) {} ≥ {}",
            g.strong_positive_at,
            pct(r.strong_false_positive_rate),
            pct(g.pass_strong_fp)
        ));
    }
    if r.false_negative_rate >= g.pass_fn {
        review.push(format!(
            "false negatives {} ≥ {}",
            pct(r.false_negative_rate),
            pct(g.pass_fn)
        ));
    }
    if review.is_empty() {
        (Decision::Pass, review)
    } else {
        (Decision::Review, review)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(fp: f64, strong: f64, fneg: f64, var: f64) -> Decision {
        decide(
            &ScoreRates {
                false_positive_rate: fp,
                strong_false_positive_rate: strong,
                false_negative_rate: fneg,
                mean_dimension_variance: var,
            },
            &ScoreGate::default(),
        )
        .0
    }

    #[test]
    fn the_decision_matrix_at_each_boundary() {
        assert_eq!(at(0.0, 0.0, 0.0, 2.0), Decision::Pass);
        // False positives: < 10% pass, 10% and up to 20% review, above fail.
        assert_eq!(at(0.0999, 0.0, 0.0, 2.0), Decision::Pass);
        assert_eq!(at(0.10, 0.0, 0.0, 2.0), Decision::Review);
        assert_eq!(at(0.20, 0.0, 0.0, 2.0), Decision::Review);
        assert_eq!(at(0.2001, 0.0, 0.0, 2.0), Decision::Fail);
        // Strong false positives: < 5% pass, 5% reviews.
        assert_eq!(at(0.05, 0.0499, 0.0, 2.0), Decision::Pass);
        assert_eq!(at(0.05, 0.05, 0.0, 2.0), Decision::Review);
        // False negatives: < 20% pass, 20–30% review, above fail.
        assert_eq!(at(0.0, 0.0, 0.1999, 2.0), Decision::Pass);
        assert_eq!(at(0.0, 0.0, 0.20, 2.0), Decision::Review);
        assert_eq!(at(0.0, 0.0, 0.30, 2.0), Decision::Review);
        assert_eq!(at(0.0, 0.0, 0.3001, 2.0), Decision::Fail);
        // Variance must exceed 1.0.
        assert_eq!(at(0.0, 0.0, 0.0, 1.0), Decision::Fail);
        assert_eq!(at(0.0, 0.0, 0.0, 1.0001), Decision::Pass);
    }

    #[test]
    fn rates_count_each_stratum_against_its_bound() {
        let g = ScoreGate::default();
        // Off-topic: 5.0 is a false positive (≥), 7.0 a strong one; on-topic 4.99 a negative.
        let off = [1.0, 5.0, 7.0, 2.0];
        let on = [4.99, 5.0, 8.0, 9.0, 6.0];
        let scores = vec![vec![0.0, 10.0], vec![10.0, 0.0]];
        let r = rates(&off, &on, &scores, &g);
        assert_eq!(r.false_positive_rate, 0.5);
        assert_eq!(r.strong_false_positive_rate, 0.25);
        assert_eq!(r.false_negative_rate, 0.2);
        assert_eq!(r.mean_dimension_variance, 25.0);
        assert_eq!(decide(&r, &g).0, Decision::Fail);
    }
}
