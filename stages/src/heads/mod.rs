//! Sequence heads: `head_train` (a base decoder, optionally with LoRA, plus a
//! regression, listwise or pairwise head) and `head_eval` (predictions, metrics and
//! the deployment gate). What they share is here: [`DataSpec`], how a record becomes
//! a training unit (the text template, the target fields or the candidate group),
//! saved with the model so that the evaluation reads records exactly as training did,
//! and the per-objective metrics.

pub mod head_eval;
pub mod head_train;

use std::collections::BTreeMap;

use pipe_train::heads::{Objective, Unit};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::contract::StageError;

/// Which end of a long text is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncate {
    /// Keep the first `max_len` tokens.
    #[default]
    Right,
    /// Keep the last `max_len` tokens.
    Left,
}

/// How records become units; saved as `head_spec.json` beside the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    /// The objective.
    pub objective: Objective,
    /// The text template (its contents), minijinja over the record; listwise adds
    /// `candidate`, pairwise adds `answer`.
    pub template: String,
    /// mse: the record fields (dotted paths) of the `D` targets.
    #[serde(default)]
    pub targets: Vec<String>,
    /// mse: the names of the outputs (the last path component of each target).
    #[serde(default)]
    pub names: Vec<String>,
    /// listwise: the record field holding the candidates (an array).
    #[serde(default)]
    pub candidates: Option<String>,
    /// listwise: the candidate field holding its reward.
    #[serde(default)]
    pub reward: Option<String>,
    /// listwise: soft targets `softmax(reward / τ)` instead of the best candidate.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// pairwise: the record fields of the chosen and rejected answers.
    #[serde(default)]
    pub chosen: Option<String>,
    /// See `chosen`.
    #[serde(default)]
    pub rejected: Option<String>,
    /// pairwise: a record field with a per-pair margin.
    #[serde(default)]
    pub margin: Option<String>,
    /// Tokens per text.
    pub max_len: usize,
    /// Which end of a long text is kept.
    pub truncate: Truncate,
}

/// A dotted path (`oracle.agency`) in a record.
pub fn lookup<'a>(record: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(record, |v, k| v.get(k))
}

/// A number at `path`: a JSON number, or a string holding one.
pub fn number_at(record: &Value, path: &str) -> Result<f64, String> {
    let v = lookup(record, path).ok_or_else(|| format!("`{path}`: missing"))?;
    let x = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match x {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(format!("`{path}`: expected a number, got {v}")),
    }
}

impl DataSpec {
    fn tokens(
        &self,
        tok: &pipe_train::tokenizer::TextTokenizer,
        ctx: &Value,
    ) -> Result<Vec<u32>, String> {
        let text = crate::prompt::render_template(&self.template, ctx)?;
        let mut ids = tok.encode(&text).map_err(|e| format!("tokenizing: {e}"))?;
        if ids.len() > self.max_len {
            match self.truncate {
                Truncate::Right => ids.truncate(self.max_len),
                Truncate::Left => {
                    ids.drain(..ids.len() - self.max_len);
                }
            }
        }
        if ids.is_empty() {
            return Err("the template renders to no token".into());
        }
        Ok(ids)
    }

    /// The unit of one record (targets as they are, not standardised).
    pub fn unit(
        &self,
        tok: &pipe_train::tokenizer::TextTokenizer,
        record: &Value,
    ) -> Result<Unit, String> {
        match self.objective {
            Objective::Mse => {
                let target = self
                    .targets
                    .iter()
                    .map(|t| number_at(record, t).map(|x| x as f32))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Unit {
                    seqs: vec![self.tokens(tok, record)?],
                    target,
                    margin: 0.0,
                })
            }
            Objective::Listwise => {
                let field = self.candidates.as_deref().unwrap_or("candidates");
                let cands = lookup(record, field)
                    .and_then(Value::as_array)
                    .ok_or_else(|| format!("`{field}`: expected an array of candidates"))?;
                if cands.len() < 2 {
                    return Err(format!(
                        "`{field}`: a group needs 2 or more candidates, found {}",
                        cands.len()
                    ));
                }
                let reward = self.reward.as_deref().unwrap_or("reward");
                let mut rewards = Vec::new();
                let mut seqs = Vec::new();
                for (i, c) in cands.iter().enumerate() {
                    rewards.push(number_at(c, reward).map_err(|e| format!("`{field}[{i}]`.{e}"))?);
                    let mut ctx = record.clone();
                    ctx["candidate"] = c.clone();
                    seqs.push(self.tokens(tok, &ctx)?);
                }
                Ok(Unit {
                    seqs,
                    target: pipe_train::heads::listwise_targets(&rewards, self.temperature)
                        .map_err(|e| e.to_string())?,
                    margin: 0.0,
                })
            }
            Objective::Pairwise => {
                let mut seqs = Vec::new();
                for f in [&self.chosen, &self.rejected] {
                    let f = f.as_deref().unwrap_or("chosen");
                    let a = lookup(record, f)
                        .and_then(Value::as_str)
                        .ok_or_else(|| format!("`{f}`: expected the answer text"))?;
                    let mut ctx = record.clone();
                    ctx["answer"] = Value::String(a.to_string());
                    seqs.push(self.tokens(tok, &ctx)?);
                }
                let margin = match &self.margin {
                    Some(m) => number_at(record, m)? as f32,
                    None => 0.0,
                };
                Ok(Unit {
                    seqs,
                    target: vec![],
                    margin,
                })
            }
        }
    }

    /// Units of numbered records; an error names `file:line` and the field.
    pub fn units(
        &self,
        tok: &pipe_train::tokenizer::TextTokenizer,
        file: &str,
        records: &[(usize, Value)],
    ) -> Result<Vec<Unit>, StageError> {
        records
            .iter()
            .map(|(line, r)| {
                self.unit(tok, r)
                    .map_err(|e| StageError::Failed(format!("{file}:{line}: {e}")))
            })
            .collect()
    }
}

/// Per-dimension `(mean, std)` of targets (std 1 where a dimension is constant).
pub fn standardization(units: &[Unit]) -> Vec<(f64, f64)> {
    let d = units.first().map(|u| u.target.len()).unwrap_or(0);
    (0..d)
        .map(|k| {
            let xs: Vec<f64> = units.iter().map(|u| u.target[k] as f64).collect();
            let n = xs.len().max(1) as f64;
            let m = xs.iter().sum::<f64>() / n;
            let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
            (m, if v > 1e-12 { v.sqrt() } else { 1.0 })
        })
        .collect()
}

/// The targets of `units` standardised with `stats`.
pub fn standardize(units: &[Unit], stats: &[(f64, f64)]) -> Vec<Unit> {
    units
        .iter()
        .map(|u| Unit {
            target: u
                .target
                .iter()
                .zip(stats)
                .map(|(t, (m, s))| ((*t as f64 - m) / s) as f32)
                .collect(),
            ..u.clone()
        })
        .collect()
}

/// Predictions in target units: `mean + std · output` per dimension.
pub fn destandardize(pred: &[f32], stats: &[(f64, f64)]) -> Vec<f64> {
    if stats.is_empty() {
        return pred.iter().map(|&p| p as f64).collect();
    }
    pred.iter()
        .zip(stats)
        .map(|(p, (m, s))| m + s * *p as f64)
        .collect()
}

/// Regression metrics of predictions vs targets (target units): `mae`, `rmse`, and
/// `mae.<dim>`, `rmse.<dim>`, `spearman.<dim>` per dimension.
pub fn regression_metrics(
    names: &[String],
    pred: &[Vec<f64>],
    gold: &[Vec<f64>],
) -> BTreeMap<String, f64> {
    use crate::metrics::regression::{mae, rmse, spearman};
    let mut m = BTreeMap::new();
    let flat_p: Vec<f64> = pred.iter().flatten().copied().collect();
    let flat_g: Vec<f64> = gold.iter().flatten().copied().collect();
    m.insert("mae".into(), mae(&flat_p, &flat_g));
    m.insert("rmse".into(), rmse(&flat_p, &flat_g));
    for (k, n) in names.iter().enumerate() {
        let p: Vec<f64> = pred.iter().map(|r| r[k]).collect();
        let g: Vec<f64> = gold.iter().map(|r| r[k]).collect();
        m.insert(format!("mae.{n}"), mae(&p, &g));
        m.insert(format!("rmse.{n}"), rmse(&p, &g));
        if let Some(s) = spearman(&p, &g) {
            m.insert(format!("spearman.{n}"), s);
        }
    }
    m
}

/// Ranking metrics of listwise groups: `top1` (the top-scored candidate is a best
/// one) and `mrr` (reciprocal rank of the first best candidate).
pub fn listwise_metrics(scores: &[Vec<f64>], units: &[Unit]) -> BTreeMap<String, f64> {
    let (mut top1, mut mrr) = (0.0, 0.0);
    for (s, u) in scores.iter().zip(units) {
        let best = u.target.iter().copied().fold(f32::MIN, f32::max);
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        if u.target[order[0]] == best {
            top1 += 1.0;
        }
        if let Some(r) = order.iter().position(|&i| u.target[i] == best) {
            mrr += 1.0 / (r + 1) as f64;
        }
    }
    let n = units.len().max(1) as f64;
    [("top1".to_string(), top1 / n), ("mrr".to_string(), mrr / n)].into()
}

/// Pairwise metrics: `accuracy` (chosen above rejected) and pooled `roc_auc`.
pub fn pairwise_metrics(scores: &[(f64, f64)]) -> BTreeMap<String, f64> {
    let right = scores.iter().filter(|(c, r)| c > r).count() as f64;
    let mut all = Vec::new();
    let mut labels = Vec::new();
    for (c, r) in scores {
        all.extend([*c, *r]);
        labels.extend([true, false]);
    }
    let mut m = BTreeMap::new();
    m.insert("accuracy".into(), right / scores.len().max(1) as f64);
    if let Some(a) = crate::metrics::ranking::roc_auc(&all, &labels) {
        m.insert("roc_auc".into(), a);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_that_are_not_numbers_are_named() {
        let r = serde_json::json!({"oracle": {"agency": 3, "wonder": "high"}});
        assert_eq!(number_at(&r, "oracle.agency").unwrap(), 3.0);
        let e = number_at(&r, "oracle.wonder").unwrap_err();
        assert!(
            e.contains("`oracle.wonder`") && e.contains("expected a number"),
            "{e}"
        );
        assert!(number_at(&r, "oracle.hope")
            .unwrap_err()
            .contains("missing"));
    }

    #[test]
    fn standardization_round_trips() {
        let units: Vec<Unit> = [[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]]
            .iter()
            .map(|t| Unit {
                seqs: vec![vec![1]],
                target: t.to_vec(),
                margin: 0.0,
            })
            .collect();
        let stats = standardization(&units);
        assert!((stats[0].0 - 3.0).abs() < 1e-12 && (stats[1].1 - 1.0).abs() < 1e-12);
        let z = standardize(&units, &stats);
        let back = destandardize(&z[2].target, &stats);
        assert!((back[0] - 5.0).abs() < 1e-5 && (back[1] - 5.0).abs() < 1e-5);
    }

    #[test]
    fn listwise_metrics_count_ties_as_best() {
        let u = Unit {
            seqs: vec![vec![1]; 3],
            target: vec![0.5, 0.0, 0.5],
            margin: 0.0,
        };
        let m = listwise_metrics(&[vec![0.1, 0.9, 0.5]], std::slice::from_ref(&u));
        assert_eq!((m["top1"], m["mrr"]), (0.0, 0.5));
        let m = listwise_metrics(&[vec![0.1, 0.0, 0.5]], &[u]);
        assert_eq!((m["top1"], m["mrr"]), (1.0, 1.0));
    }
}
