//! BM25 retrieval over a passage corpus, and hard negatives: high-scoring
//! passages that do not contain a gold answer. Used by `build_data` to attach
//! evidence to sources that have none and to mine negatives for every record.
//!
//! Scoring is Okapi BM25 with Lucene's non-negative IDF,
//! `ln(1 + (N − df + 0.5) / (df + 0.5))`. Ties break by passage order, so results
//! are deterministic.

use std::collections::HashMap;

use crate::data::split::normalize;

/// A passage of the corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct Passage {
    /// Stable id.
    pub id: String,
    /// Title (indexed with the text).
    pub title: String,
    /// Body text.
    pub text: String,
}

/// An inverted index with BM25 scoring.
pub struct Bm25 {
    passages: Vec<Passage>,
    postings: HashMap<String, Vec<(u32, u32)>>,
    lengths: Vec<u32>,
    avg_len: f64,
    k1: f64,
    b: f64,
}

/// Lowercased alphanumeric words (any script).
pub fn terms(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

impl Bm25 {
    /// Indexes passages with the usual parameters (k1 = 1.2, b = 0.75).
    pub fn new(passages: Vec<Passage>) -> Bm25 {
        let mut postings: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
        let mut lengths = Vec::with_capacity(passages.len());
        for (i, p) in passages.iter().enumerate() {
            let words = terms(&format!("{} {}", p.title, p.text));
            lengths.push(words.len() as u32);
            let mut tf: HashMap<String, u32> = HashMap::new();
            for w in words {
                *tf.entry(w).or_default() += 1;
            }
            for (w, n) in tf {
                postings.entry(w).or_default().push((i as u32, n));
            }
        }
        let avg_len = lengths.iter().map(|&l| l as f64).sum::<f64>() / lengths.len().max(1) as f64;
        Bm25 {
            passages,
            postings,
            lengths,
            avg_len: avg_len.max(1.0),
            k1: 1.2,
            b: 0.75,
        }
    }

    /// The indexed passages.
    pub fn passages(&self) -> &[Passage] {
        &self.passages
    }

    /// `(passage index, score)` of the best `k` passages for `query`, best first;
    /// passages sharing no term with the query are not returned.
    pub fn search(&self, query: &str, k: usize) -> Vec<(usize, f64)> {
        let n = self.passages.len() as f64;
        let mut scores: HashMap<u32, f64> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for t in terms(query) {
            if !seen.insert(t.clone()) {
                continue;
            }
            let Some(list) = self.postings.get(&t) else {
                continue;
            };
            let df = list.len() as f64;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &(doc, tf) in list {
                let tf = tf as f64;
                let len = self.lengths[doc as usize] as f64;
                let norm = tf + self.k1 * (1.0 - self.b + self.b * len / self.avg_len);
                *scores.entry(doc).or_default() += idf * tf * (self.k1 + 1.0) / norm;
            }
        }
        let mut ranked: Vec<(usize, f64)> =
            scores.into_iter().map(|(d, s)| (d as usize, s)).collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(k);
        ranked
    }

    /// The best `k` passages for `query` that contain none of `answers` (after
    /// SQuAD-style normalisation, as whole words) and are not in `exclude`.
    pub fn hard_negatives(
        &self,
        query: &str,
        answers: &[String],
        exclude: &[String],
        k: usize,
    ) -> Vec<usize> {
        let gold: Vec<String> = answers
            .iter()
            .map(|a| normalize(a))
            .filter(|a| !a.is_empty())
            .collect();
        self.search(query, self.passages.len())
            .into_iter()
            .map(|(i, _)| i)
            .filter(|&i| !exclude.contains(&self.passages[i].id))
            .filter(|&i| !contains_answer(&self.passages[i], &gold))
            .take(k)
            .collect()
    }
}

/// Whether a passage (title or text) contains one of the normalised answers as whole words.
pub fn contains_answer(p: &Passage, normalized_answers: &[String]) -> bool {
    let hay = format!(" {} {} ", normalize(&p.title), normalize(&p.text));
    normalized_answers
        .iter()
        .any(|a| hay.contains(&format!(" {a} ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<Passage> {
        let p = |id: &str, title: &str, text: &str| Passage {
            id: id.into(),
            title: title.into(),
            text: text.into(),
        };
        vec![
            p(
                "p0",
                "Kraków",
                "The Vistula flows through Kraków, a city in southern Poland.",
            ),
            p(
                "p1",
                "Warsaw",
                "Warsaw lies on the Vistula river in central Poland.",
            ),
            p(
                "p2",
                "Kraków",
                "Kraków's old town has a large market square and many churches.",
            ),
            p(
                "p3",
                "Danube",
                "The Danube flows through Vienna and Budapest.",
            ),
            p("p4", "Wisła", "Wisła is the Polish name of the river."),
        ]
    }

    #[test]
    fn ranks_by_term_overlap_and_rarity() {
        let index = Bm25::new(corpus());
        let hits = index.search("Which river flows through Kraków?", 3);
        assert_eq!(hits[0].0, 0, "{hits:?}");
        assert!(hits.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(index.search("zzz unknown", 5).is_empty());
        // Unicode words are terms.
        assert_eq!(index.search("Wisła", 1)[0].0, 4);
    }

    #[test]
    fn hard_negatives_never_contain_a_gold_answer() {
        let index = Bm25::new(corpus());
        let answers = vec!["Vistula".to_string(), "Wisła".to_string()];
        let negs = index.hard_negatives("Which river flows through Kraków?", &answers, &[], 10);
        // The Danube passage shares "flows through", the market-square one only "Kraków".
        assert_eq!(negs, vec![3, 2]);
        let gold: Vec<String> = answers.iter().map(|a| normalize(a)).collect();
        for i in negs {
            assert!(!contains_answer(&index.passages()[i], &gold));
        }
        let excluded = index.hard_negatives(
            "Which river flows through Kraków?",
            &answers,
            &["p3".into()],
            10,
        );
        assert_eq!(excluded, vec![2]);
    }

    #[test]
    fn answer_containment_is_whole_word_and_normalised() {
        let p = Passage {
            id: "x".into(),
            title: "".into(),
            text: "The Nile's delta; Nilesque styles.".into(),
        };
        assert!(contains_answer(&p, &[normalize("the Nile")]));
        assert!(!contains_answer(&p, &[normalize("Niles")]));
    }
}
