//! Calibration of stated confidences against correctness: expected calibration error
//! with equal-width bins (top label, p = 1; [`bin_of`] is also the reliability
//! diagram's binning) and the debiased ℓ2 estimator over equal-mass bins.

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
