//! Agreement between outputs (an oracle's replies, a model's answers) and gold:
//! SQuAD-normalised exact match and token F1 (max over gold answers), Cohen's kappa,
//! set precision and recall (citations), and summaries of numeric scores.

use std::collections::BTreeMap;

/// SQuAD normalisation: lower case, punctuation removed, articles (a, an, the)
/// removed, whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !(c.is_ascii_punctuation() || is_unicode_punct(*c)))
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn is_unicode_punct(c: char) -> bool {
    matches!(
        c,
        '‘' | '’' | '“' | '”' | '–' | '—' | '…' | '«' | '»' | '¿' | '¡' | '·'
    )
}

/// 1.0 when the normalised prediction equals one normalised gold answer.
pub fn exact_match(pred: &str, golds: &[String]) -> f64 {
    let p = normalize_answer(pred);
    if golds.iter().any(|g| normalize_answer(g) == p) {
        1.0
    } else {
        0.0
    }
}

/// Token F1 (bag of normalised tokens), max over gold answers.
pub fn token_f1(pred: &str, golds: &[String]) -> f64 {
    golds.iter().map(|g| f1_one(pred, g)).fold(0.0, f64::max)
}

fn f1_one(pred: &str, gold: &str) -> f64 {
    let p = normalize_answer(pred);
    let g = normalize_answer(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    if pt.is_empty() || gt.is_empty() {
        return if pt == gt { 1.0 } else { 0.0 };
    }
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut common = 0i64;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / pt.len() as f64;
    let recall = common as f64 / gt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Cohen's kappa of two labelings of the same items; 1.0 when both are constant
/// and equal (no disagreement possible), 0.0 for an empty input.
pub fn cohen_kappa(a: &[String], b: &[String]) -> f64 {
    assert_eq!(a.len(), b.len());
    let n = a.len() as f64;
    if a.is_empty() {
        return 0.0;
    }
    let agree = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / n;
    let mut ca: BTreeMap<&str, f64> = BTreeMap::new();
    let mut cb: BTreeMap<&str, f64> = BTreeMap::new();
    for (x, y) in a.iter().zip(b) {
        *ca.entry(x).or_default() += 1.0;
        *cb.entry(y).or_default() += 1.0;
    }
    let chance: f64 = ca
        .iter()
        .map(|(k, v)| v / n * cb.get(k).copied().unwrap_or(0.0) / n)
        .sum();
    if (1.0 - chance).abs() < 1e-12 {
        return if agree == 1.0 { 1.0 } else { 0.0 };
    }
    (agree - chance) / (1.0 - chance)
}

/// Precision and recall of `pred` against `gold` as sets; an empty prediction has
/// precision 1 (it claims nothing wrong) and an empty gold recall 1.
pub fn set_precision_recall(pred: &[String], gold: &[String]) -> (f64, f64) {
    let hits = pred.iter().filter(|p| gold.contains(p)).count() as f64;
    let mut uniq = pred.to_vec();
    uniq.sort();
    uniq.dedup();
    let precision = if uniq.is_empty() {
        1.0
    } else {
        uniq.iter().filter(|p| gold.contains(p)).count() as f64 / uniq.len() as f64
    };
    let recall = if gold.is_empty() {
        1.0
    } else {
        hits.min(gold.len() as f64) / gold.len() as f64
    };
    (precision, recall)
}

/// Count, mean, standard deviation, min, median and max of numbers.
pub fn summary(xs: &[f64]) -> serde_json::Value {
    if xs.is_empty() {
        return serde_json::json!({"n": 0});
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    serde_json::json!({"n": xs.len(), "mean": mean, "std": var.sqrt(), "min": s[0], "median": median, "max": s[s.len() - 1]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(xs: &[&str]) -> Vec<String> {
        xs.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn squad_normalisation_cases() {
        assert_eq!(normalize_answer("The  Eiffel Tower!"), "eiffel tower");
        assert_eq!(normalize_answer("an apple, a pear"), "apple pear");
        assert_eq!(normalize_answer("“Wisła”"), "wisła");
        assert_eq!(exact_match("the Vistula.", &v(&["Vistula", "Wisła"])), 1.0);
        assert_eq!(exact_match("Vistula river", &v(&["Vistula"])), 0.0);
        assert_eq!(exact_match("", &v(&["a"])), 1.0, "both normalise to empty");
        // pred tokens {johann, bach}, gold {johann, sebastian, bach}: p=1, r=2/3.
        let f = token_f1("Johann Bach", &v(&["Johann Sebastian Bach", "J. S. Bach"]));
        assert!((f - 0.8).abs() < 1e-12, "{f}");
        assert_eq!(token_f1("Paris", &v(&["London"])), 0.0);
        // duplicates count once per gold occurrence
        let f = token_f1("bach bach", &v(&["bach"]));
        assert!((f - 2.0 / 3.0).abs() < 1e-12, "{f}");
    }

    #[test]
    fn kappa_by_hand() {
        // 10 items, agreement 0.7; a: 5 yes 5 no; b: 6 yes 4 no → chance 0.5·0.6+0.5·0.4 = 0.5
        let a = v(&["y", "y", "y", "y", "y", "n", "n", "n", "n", "n"]);
        let b = v(&["y", "y", "y", "y", "n", "y", "y", "n", "n", "n"]);
        let k = cohen_kappa(&a, &b);
        // agreement: items 0-3 (y,y), 7-9 (n,n) = 7 → (0.7-0.5)/0.5 = 0.4
        assert!((k - 0.4).abs() < 1e-12, "{k}");
        assert_eq!(cohen_kappa(&v(&["a", "a"]), &v(&["a", "a"])), 1.0);
    }

    #[test]
    fn citations_precision_recall() {
        let (p, r) = set_precision_recall(&v(&["c1", "c2", "c9"]), &v(&["c1", "c2"]));
        assert!((p - 2.0 / 3.0).abs() < 1e-12 && (r - 1.0).abs() < 1e-12);
        let (p, r) = set_precision_recall(&[], &v(&["c1"]));
        assert_eq!((p, r), (1.0, 0.0));
    }
}
