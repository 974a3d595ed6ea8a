//! Calibration of stated confidences against correctness: expected calibration error
//! with equal-width bins (top label, p = 1; [`bin_of`] is also the reliability
//! diagram's binning), the debiased ℓ2 estimator over equal-mass bins, and the
//! ℓp calibration error over bins of β samples ([`calibration_error`], Hendrycks'
//! `calib_err` with its last bin counted).

/// The norm of [`calibration_error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum PNorm {
    /// Weighted mean of |conf − acc|.
    #[serde(rename = "1")]
    One,
    /// Square root of the weighted mean of (conf − acc)².
    #[serde(rename = "2")]
    Two,
    /// The largest |conf − acc| over bins.
    #[serde(rename = "infty", alias = "inf", alias = "max")]
    Infty,
}

/// Calibration error over equal-mass bins of `beta` samples: samples sorted by
/// confidence (ties in input order), cut into ⌊N/β⌋ bins of β with the remainder
/// joining the last bin, then `(Σ_b (n_b/N)·|conf_b − acc_b|^p)^{1/p}` (p = 1, 2) or
/// `max_b |conf_b − acc_b|` (∞). Fewer than β samples make one bin, never a silent 0.
///
/// `hendrycks_compat` reproduces Hendrycks' `calib_err` (outlier-exposure's
/// `utils/calibration_tools.py`, which the confidence-token paper's code uses): its
/// loop skips the last bin, so the last ≥ β samples never count and N < 2β gives 0.
/// With fewer than β samples that function fails (it indexes an empty bin list); so
/// does this one. Empty input is an error in both modes.
pub fn calibration_error(
    confidence: &[f64],
    correct: &[bool],
    beta: usize,
    p: PNorm,
    hendrycks_compat: bool,
) -> Result<f64, String> {
    assert_eq!(confidence.len(), correct.len());
    let n = confidence.len();
    if n == 0 {
        return Err("calibration error of no samples".into());
    }
    if beta == 0 {
        return Err("calib_beta must be at least 1".into());
    }
    if hendrycks_compat && n < beta {
        return Err(format!(
            "hendrycks_compat: {n} samples are fewer than calib_beta {beta} (the original fails here)"
        ));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| confidence[a].total_cmp(&confidence[b]).then(a.cmp(&b)));
    let bins = (n / beta).max(1);
    let counted = if hendrycks_compat { bins - 1 } else { bins };
    let mut acc_sum = 0.0f64;
    for b in 0..counted {
        let lo = b * beta;
        let hi = if b + 1 == bins { n } else { lo + beta };
        let idx = &order[lo..hi];
        let m = idx.len() as f64;
        let conf = idx.iter().map(|&i| confidence[i]).sum::<f64>() / m;
        let acc = idx.iter().filter(|&&i| correct[i]).count() as f64 / m;
        let d = (conf - acc).abs();
        match p {
            PNorm::One => acc_sum += m / n as f64 * d,
            PNorm::Two => acc_sum += m / n as f64 * d * d,
            PNorm::Infty => acc_sum = acc_sum.max(d),
        }
    }
    Ok(match p {
        PNorm::Two => acc_sum.sqrt(),
        _ => acc_sum,
    })
}

/// The equal-width bin of a confidence: bin b of B holds (b/B, (b+1)/B]; 0 falls in
/// the first bin and values outside [0, 1] are clamped.
pub fn bin_of(confidence: f64, bins: usize) -> usize {
    ((confidence.clamp(0.0, 1.0) * bins as f64).ceil() as usize).clamp(1, bins) - 1
}

/// Top-label ECE with `bins` equal-width bins over (0, 1] (p = 1): the item-weighted
/// mean of |accuracy − mean confidence| per bin. A confidence of exactly 0 falls in
/// the first bin; values outside [0, 1] are clamped.
pub fn ece_equal_width(confidence: &[f64], correct: &[bool], bins: usize) -> f64 {
    assert_eq!(confidence.len(), correct.len());
    let n = confidence.len();
    if n == 0 || bins == 0 {
        return 0.0;
    }
    let mut sum_conf = vec![0.0; bins];
    let mut sum_acc = vec![0.0; bins];
    let mut count = vec![0usize; bins];
    for (&c, &ok) in confidence.iter().zip(correct) {
        let c = c.clamp(0.0, 1.0);
        let b = bin_of(c, bins);
        sum_conf[b] += c;
        sum_acc[b] += if ok { 1.0 } else { 0.0 };
        count[b] += 1;
    }
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| (sum_acc[b] - sum_conf[b]).abs() / n as f64)
        .sum()
}

/// Debiased ℓ2 calibration error (Kumar, Liang and Ma, 2019) over `bins` equal-mass
/// bins: sqrt(max(0, Σ_b (n_b/N)·[(acc_b − conf_b)² − acc_b(1 − acc_b)/(n_b − 1)])),
/// bins with fewer than two items contributing nothing.
pub fn debiased_l2_ece_equal_mass(confidence: &[f64], correct: &[bool], bins: usize) -> f64 {
    assert_eq!(confidence.len(), correct.len());
    let n = confidence.len();
    if n == 0 || bins == 0 {
        return 0.0;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| confidence[a].total_cmp(&confidence[b]).then(a.cmp(&b)));
    let bins = bins.min(n);
    let mut total = 0.0;
    for b in 0..bins {
        let (lo, hi) = (b * n / bins, (b + 1) * n / bins);
        let m = hi - lo;
        if m < 2 {
            continue;
        }
        let idx = &order[lo..hi];
        let conf = idx.iter().map(|&i| confidence[i]).sum::<f64>() / m as f64;
        let acc = idx.iter().filter(|&&i| correct[i]).count() as f64 / m as f64;
        let err = (acc - conf).powi(2) - acc * (1.0 - acc) / (m as f64 - 1.0);
        total += m as f64 / n as f64 * err;
    }
    total.max(0.0).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ece_by_hand() {
        // Bins of width 0.1 (B = 10 for readability).
        // (0.9, 1.0]: 0.95 ✓, 0.95 ✗ → acc 0.5, conf 0.95 → |Δ| 0.45, weight 2/5
        // (0.6, 0.7]: 0.65 ✓            → |1 − 0.65| = 0.35, weight 1/5
        // (0.2, 0.3]: 0.25 ✗, 0.3 ✗     → |0 − 0.275| = 0.275, weight 2/5
        let conf = [0.95, 0.95, 0.65, 0.25, 0.3];
        let ok = [true, false, true, false, false];
        let e = ece_equal_width(&conf, &ok, 10);
        let want = 0.4 * 0.45 + 0.2 * 0.35 + 0.4 * 0.275;
        assert!((e - want).abs() < 1e-12, "{e} vs {want}");
        // 15 bins: 0.95 → (14/15, 1], 0.65 → (0.6, 0.667], 0.25, 0.3 → (0.2, 0.267] and (0.267, 0.333]
        let e15 = ece_equal_width(&conf, &ok, 15);
        let want15 = 0.4 * 0.45 + 0.2 * 0.35 + 0.2 * 0.25 + 0.2 * 0.3;
        assert!((e15 - want15).abs() < 1e-12, "{e15} vs {want15}");
        // Perfect calibration and a confidence of exactly 0.
        assert_eq!(ece_equal_width(&[1.0, 0.0], &[true, false], 15), 0.0);
    }

    #[test]
    fn calibration_error_by_hand() {
        use PNorm::*;
        // β = 2, N = 5 (not a multiple): sorted confidences 0.1 0.2 | 0.6 0.8 0.9, the
        // remainder joining the last bin. Bin 1: conf 0.15, acc 0.5 → 0.35, weight 2/5.
        // Bin 2: conf 2.3/3, acc 2/3 → 0.1, weight 3/5.
        let conf = [0.9, 0.1, 0.6, 0.2, 0.8];
        let ok = [true, false, false, true, true];
        let (d1, d2) = (0.35f64, 2.3f64 / 3.0 - 2.0 / 3.0);
        let e = |p| calibration_error(&conf, &ok, 2, p, false).unwrap();
        assert!((e(One) - (0.4 * d1 + 0.6 * d2)).abs() < 1e-12);
        assert!((e(Two) - (0.4 * d1 * d1 + 0.6 * d2 * d2).sqrt()).abs() < 1e-12);
        assert!((e(Infty) - d1.max(d2)).abs() < 1e-12);
        // N < β: one bin of everything (conf 0.52, acc 0.6), not 0.
        let one = calibration_error(&conf, &ok, 100, One, false).unwrap();
        assert!((one - 0.08).abs() < 1e-12, "{one}");
        // Hendrycks' last-bin drop: only bin 1 counts; N < 2β gives 0; N < β fails.
        let h = |p| calibration_error(&conf, &ok, 2, p, true).unwrap();
        assert!((h(One) - 0.4 * d1).abs() < 1e-12);
        assert!((h(Two) - (0.4 * d1 * d1).sqrt()).abs() < 1e-12);
        assert!((h(Infty) - d1).abs() < 1e-12);
        assert_eq!(calibration_error(&conf, &ok, 3, One, true).unwrap(), 0.0);
        assert!(calibration_error(&conf, &ok, 6, One, true).is_err());
        assert!(calibration_error(&[], &[], 2, One, false).is_err());
    }

    /// Values from Hendrycks' `calib_err` semantics, by `scripts/reference/make_calib_fixtures.py`.
    #[test]
    fn hendrycks_compat_matches_the_reference_values() {
        let f: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/calib_err.json")).unwrap();
        let cases = f["cases"].as_array().unwrap();
        assert!(cases.len() >= 6);
        for c in cases {
            let conf: Vec<f64> = serde_json::from_value(c["confidence"].clone()).unwrap();
            let ok: Vec<bool> = serde_json::from_value(c["correct"].clone()).unwrap();
            let beta = c["beta"].as_u64().unwrap() as usize;
            let p: PNorm = serde_json::from_value(c["p"].clone()).unwrap();
            let want = c["calib_err"].as_f64().unwrap();
            let got = calibration_error(&conf, &ok, beta, p, true).unwrap();
            assert!(
                (got - want).abs() < 1e-12,
                "N {} β {beta} p {p:?}: {got} vs {want}",
                conf.len()
            );
        }
    }

    #[test]
    fn debiased_l2_by_hand() {
        // Two equal-mass bins of 3: low {0.1, 0.2, 0.3} with 1 correct, high {0.7, 0.8, 0.9}
        // with 3 correct.
        let conf = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3];
        let ok = [true, false, true, true, true, false];
        let low = (1.0f64 / 3.0 - 0.2).powi(2) - (1.0 / 3.0) * (2.0 / 3.0) / 2.0;
        let high = (1.0f64 - 0.8).powi(2) - 0.0;
        let want = (0.5 * low + 0.5 * high).max(0.0).sqrt();
        let got = debiased_l2_ece_equal_mass(&conf, &ok, 2);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }
}
