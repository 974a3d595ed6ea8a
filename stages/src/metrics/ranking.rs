//! How well scores order items: ROC-AUC with ties (Mann–Whitney with average ranks).
//! The routing curve of confidence scores ([`routing_curve`]). Ranking metrics over
//! candidate groups (accuracy, MRR, reward ratio) belong here too.

/// ROC-AUC of `scores` for binary `labels` (true = positive): the probability that a
/// random positive outscores a random negative, ties counting one half (Mann–Whitney
/// with average ranks). `None` when one class is absent.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    assert_eq!(scores.len(), labels.len());
    let pos = labels.iter().filter(|&&l| l).count();
    let neg = labels.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their average.
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += avg * order[i..=j].iter().filter(|&&k| labels[k]).count() as f64;
        i = j + 1;
    }
    let pos_f = pos as f64;
    Some((rank_sum_pos - pos_f * (pos_f + 1.0) / 2.0) / (pos_f * neg as f64))
}

/// The routing view of confidence scores: route the least confident `k` of `n` items
/// to another model and keep the rest. Returns, for k = 0 … n − 1, `(k / n, accuracy of
/// the kept n − k)`, and the area under that curve (trapezoids over the routing rate,
/// from 0 to (n − 1)/n). Items of equal confidence are routed in no particular order:
/// within a tie group the kept accuracy is its expectation (each routed item of the
/// group is right with the group's share of right answers), so the curve does not
/// depend on the input order. Scores that order right answers above wrong ones make it
/// rise; all-equal scores give a flat curve. Empty input: no points, area 0.
pub fn routing_curve(confidence: &[f64], correct: &[bool]) -> (Vec<(f64, f64)>, f64) {
    assert_eq!(confidence.len(), correct.len());
    let n = confidence.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| confidence[a].total_cmp(&confidence[b]));
    let mut right = correct.iter().filter(|&&c| c).count() as f64;
    let mut points = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n && confidence[order[end]] == confidence[order[start]] {
            end += 1;
        }
        let g = (end - start) as f64;
        let share = order[start..end].iter().filter(|&&i| correct[i]).count() as f64 / g;
        for j in 0..end - start {
            let k = start + j;
            let kept_right = right - j as f64 * share;
            points.push((k as f64 / n as f64, kept_right / (n - k) as f64));
        }
        right -= share * g;
        start = end;
    }
    let area = points
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
        .sum();
    (points, area)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_curve_by_hand() {
        // Confidences 0.9 ✓, 0.2 ✗, 0.6 ✓, 0.4 ✗: route 0.2, then 0.4, then 0.6.
        let (pts, area) = routing_curve(&[0.9, 0.2, 0.6, 0.4], &[true, false, true, false]);
        assert_eq!(
            pts,
            vec![(0.0, 0.5), (0.25, 2.0 / 3.0), (0.5, 1.0), (0.75, 1.0)]
        );
        let want = 0.25 * (0.5 + 2.0 / 3.0) / 2.0 + 0.25 * (2.0 / 3.0 + 1.0) / 2.0 + 0.25;
        assert!((area - want).abs() < 1e-12);
        assert_eq!(routing_curve(&[], &[]), (vec![], 0.0));
        // All tied: flat at the overall accuracy, whatever the input order.
        let (flat, _) = routing_curve(&[0.5; 4], &[true, false, false, true]);
        assert!(flat.iter().all(|p| (p.1 - 0.5).abs() < 1e-12), "{flat:?}");
        // A tie group of two (one right) between a wrong low and a right high item.
        let (pts, _) = routing_curve(&[0.1, 0.5, 0.5, 0.9], &[false, true, false, true]);
        let want = [2.0 / 4.0, 2.0 / 3.0, 1.5 / 2.0, 1.0];
        for (p, w) in pts.iter().zip(want) {
            assert!((p.1 - w).abs() < 1e-12, "{pts:?}");
        }
    }

    #[test]
    fn roc_auc_with_ties() {
        assert_eq!(roc_auc(&[0.1, 0.9], &[false, true]), Some(1.0));
        assert_eq!(roc_auc(&[0.9, 0.1], &[false, true]), Some(0.0));
        assert_eq!(roc_auc(&[0.5, 0.5], &[false, true]), Some(0.5));
        // pos {0.8, 0.5}, neg {0.5, 0.2}: pairs (0.8>0.5) 1, (0.8>0.2) 1, (0.5=0.5) ½, (0.5>0.2) 1 → 3.5/4
        let auc = roc_auc(&[0.8, 0.5, 0.5, 0.2], &[true, true, false, false]).unwrap();
        assert!((auc - 0.875).abs() < 1e-12);
        assert_eq!(roc_auc(&[0.1, 0.2], &[true, true]), None);
    }
}
