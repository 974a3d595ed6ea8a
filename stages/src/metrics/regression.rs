//! Regression metrics and the deployment gate of a distilled scorer: MAE, RMSE,
//! Pearson and Spearman correlation (average ranks for ties, as `scipy.stats`), the
//! share of predictions near their own mean (a model that predicts almost the same
//! score for everything can still have a low MAE on a skewed test set), and the
//! DEPLOY / REVIEW / FAIL decision on them.

use serde::{Deserialize, Serialize};

use crate::contract::Decision;

/// Mean absolute error (NaN for no items).
pub fn mae(pred: &[f64], gold: &[f64]) -> f64 {
    pred.iter()
        .zip(gold)
        .map(|(p, g)| (p - g).abs())
        .sum::<f64>()
        / pred.len() as f64
}

/// Root mean squared error (NaN for no items).
pub fn rmse(pred: &[f64], gold: &[f64]) -> f64 {
    (pred
        .iter()
        .zip(gold)
        .map(|(p, g)| (p - g).powi(2))
        .sum::<f64>()
        / pred.len() as f64)
        .sqrt()
}

/// Pearson correlation; `None` when either side is constant or there are < 2 items.
pub fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len().min(b.len());
    if n < 2 {
        return None;
    }
    let (ma, mb) = (
        a.iter().sum::<f64>() / n as f64,
        b.iter().sum::<f64>() / n as f64,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma).powi(2);
        sbb += (y - mb).powi(2);
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return None;
    }
    Some(sab / (saa * sbb).sqrt())
}

/// Ranks from 1, tied values sharing their average rank.
pub fn average_ranks(xs: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..xs.len()).collect();
    idx.sort_by(|&i, &j| xs[i].total_cmp(&xs[j]));
    let mut ranks = vec![0.0; xs.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && xs[idx[j + 1]] == xs[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's rank correlation (Pearson on average ranks).
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    pearson(&average_ranks(a), &average_ranks(b))
}

/// Share of predictions within `width` of their mean.
pub fn near_mean_share(pred: &[f64], width: f64) -> f64 {
    if pred.is_empty() {
        return f64::NAN;
    }
    let m = pred.iter().sum::<f64>() / pred.len() as f64;
    pred.iter().filter(|p| (*p - m).abs() <= width).count() as f64 / pred.len() as f64
}

/// Thresholds of the deployment gate (defaults: the distillation workflow's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeployThresholds {
    /// DEPLOY needs the test MAE strictly below this.
    pub deploy_mae: f64,
    /// … and at least `deploy_min_dims` dimensions with MAE strictly below this …
    pub deploy_dim_mae: f64,
    /// … that many.
    pub deploy_min_dims: usize,
    /// … and |val MAE − test MAE| at most this.
    pub max_val_test_gap: f64,
    /// FAIL when the test MAE is above this.
    pub fail_mae: f64,
    /// FAIL when any dimension's MAE is above this.
    pub fail_dim_mae: f64,
    /// REVIEW (at best) when this many dimensions or more have MAE above `review_dim_mae`.
    pub review_dims: usize,
    /// See `review_dims`.
    pub review_dim_mae: f64,
    /// REVIEW (at best) when more than this share of predictions lie within ±0.5 of
    /// their mean (a nearly constant predictor).
    pub max_near_mean_share: f64,
}

impl Default for DeployThresholds {
    fn default() -> Self {
        DeployThresholds {
            deploy_mae: 1.0,
            deploy_dim_mae: 1.1,
            deploy_min_dims: 5,
            max_val_test_gap: 0.05,
            fail_mae: 1.2,
            fail_dim_mae: 2.0,
            review_dims: 3,
            review_dim_mae: 1.2,
            max_near_mean_share: 0.9,
        }
    }
}

/// What the gate looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct DeployEvidence<'a> {
    /// Test MAE over every dimension.
    pub test_mae: f64,
    /// Validation MAE of the kept model.
    pub val_mae: f64,
    /// Test MAE per dimension, by name.
    pub dim_mae: &'a [(String, f64)],
    /// Whether training converged (the kept model beats the model before training).
    pub converged: bool,
    /// [`near_mean_share`] of the overall test predictions.
    pub near_mean_share: f64,
}

/// DEPLOY when every DEPLOY condition holds, FAIL when any FAIL condition does,
/// REVIEW otherwise; with one reason per condition missed.
pub fn deploy_decision(e: &DeployEvidence, t: &DeployThresholds) -> (Decision, Vec<String>) {
    let mut fail = Vec::new();
    if e.test_mae > t.fail_mae || e.test_mae.is_nan() {
        fail.push(format!("test MAE {:.3} > {}", e.test_mae, t.fail_mae));
    }
    for (n, m) in e.dim_mae {
        if *m > t.fail_dim_mae {
            fail.push(format!("{n}: MAE {m:.3} > {}", t.fail_dim_mae));
        }
    }
    if !e.converged {
        fail.push("no convergence: the kept model is no better than the untrained one".into());
    }
    if !fail.is_empty() {
        return (Decision::Fail, fail);
    }
    let mut review = Vec::new();
    if e.test_mae >= t.deploy_mae {
        review.push(format!("test MAE {:.3} ≥ {}", e.test_mae, t.deploy_mae));
    }
    let under = e
        .dim_mae
        .iter()
        .filter(|(_, m)| *m < t.deploy_dim_mae)
        .count();
    if under < t.deploy_min_dims.min(e.dim_mae.len()) {
        review.push(format!(
            "{under} of {} dimensions have MAE < {} (need {})",
            e.dim_mae.len(),
            t.deploy_dim_mae,
            t.deploy_min_dims
        ));
    }
    let over = e
        .dim_mae
        .iter()
        .filter(|(_, m)| *m > t.review_dim_mae)
        .count();
    if over >= t.review_dims {
        review.push(format!("{over} dimensions have MAE > {}", t.review_dim_mae));
    }
    let gap = (e.val_mae - e.test_mae).abs();
    if gap > t.max_val_test_gap + 1e-12 {
        review.push(format!(
            "|val − test| MAE {gap:.3} > {}",
            t.max_val_test_gap
        ));
    }
    if e.near_mean_share > t.max_near_mean_share {
        review.push(format!(
            "nearly constant: {:.1}% of predictions within ±0.5 of their mean (> {:.0}%)",
            100.0 * e.near_mean_share,
            100.0 * t.max_near_mean_share
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

    #[test]
    fn errors_and_correlations_on_hand_computed_cases() {
        let (p, g) = ([1.0, 2.0, 4.0], [1.0, 3.0, 2.0]);
        assert!((mae(&p, &g) - 1.0).abs() < 1e-12);
        assert!((rmse(&p, &g) - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(
            average_ranks(&[3.0, 1.0, 3.0, 2.0]),
            vec![3.5, 1.0, 3.5, 2.0]
        );
        // scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9486832980505138
        let s = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((s - 0.9486832980505138).abs() < 1e-12, "{s}");
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
        assert_eq!(
            near_mean_share(&[5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 9.0], 0.5),
            0.9
        );
    }

    fn dims(m: &[f64]) -> Vec<(String, f64)> {
        m.iter()
            .enumerate()
            .map(|(i, v)| (format!("d{i}"), *v))
            .collect()
    }

    fn decide(test: f64, val: f64, d: &[f64], share: f64) -> Decision {
        let d = dims(d);
        deploy_decision(
            &DeployEvidence {
                test_mae: test,
                val_mae: val,
                dim_mae: &d,
                converged: true,
                near_mean_share: share,
            },
            &DeployThresholds::default(),
        )
        .0
    }

    #[test]
    fn the_deploy_gate_at_each_boundary() {
        let good = [0.9, 0.9, 0.9, 0.9, 0.9, 1.15, 1.15, 1.15];
        assert_eq!(decide(0.99, 0.99, &good, 0.3), Decision::Pass);
        // Test MAE: < 1.0 deploys, 1.0 reviews, 1.2 still reviews, above fails.
        assert_eq!(decide(1.0, 1.0, &good, 0.3), Decision::Review);
        assert_eq!(decide(1.2, 1.2, &good, 0.3), Decision::Review);
        assert_eq!(decide(1.2001, 1.2001, &good, 0.3), Decision::Fail);
        // Five dimensions under 1.1 are enough; 1.1 itself is not under.
        let four = [0.9, 0.9, 0.9, 0.9, 1.1, 1.15, 1.15, 1.15];
        assert_eq!(decide(0.99, 0.99, &four, 0.3), Decision::Review);
        // Three dimensions over 1.2 review; two do not; one over 2.0 fails.
        let three = [0.5, 0.5, 0.5, 0.5, 0.5, 1.21, 1.21, 1.21];
        assert_eq!(decide(0.8, 0.8, &three, 0.3), Decision::Review);
        let two = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.21, 1.21];
        assert_eq!(decide(0.8, 0.8, &two, 0.3), Decision::Pass);
        let far = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0001];
        assert_eq!(decide(0.8, 0.8, &far, 0.3), Decision::Fail);
        let at = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0];
        assert_eq!(decide(0.8, 0.8, &at, 0.3), Decision::Pass);
        // |val − test| of 0.05 passes, more reviews.
        assert_eq!(decide(0.9, 0.95, &good, 0.3), Decision::Pass);
        assert_eq!(decide(0.9, 0.9501, &good, 0.3), Decision::Review);
        // A nearly constant predictor never deploys.
        assert_eq!(decide(0.5, 0.5, &good, 0.9), Decision::Pass);
        assert_eq!(decide(0.5, 0.5, &good, 0.95), Decision::Review);
        // No convergence fails whatever the numbers.
        let d = dims(&good);
        let (dec, why) = deploy_decision(
            &DeployEvidence {
                test_mae: 0.5,
                val_mae: 0.5,
                dim_mae: &d,
                converged: false,
                near_mean_share: 0.1,
            },
            &DeployThresholds::default(),
        );
        assert_eq!(dec, Decision::Fail);
        assert!(why[0].contains("no convergence"));
    }
}
