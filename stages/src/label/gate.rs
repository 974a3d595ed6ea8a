//! What the `calibrate` and `validate` gates share: what to compare ([`Compare`]:
//! answers, citations, labels, scores against the records' gold), the stratified
//! sample ([`SampleSpec`], drawn seeded with `exclude`d ids left out), thresholds
//! (`pass_if` / `review_if`), and the measure → decide steps: PASS when every
//! `pass_if` holds, REVIEW when every `review_if` does, FAIL otherwise. The report
//! they write is in [`super::report`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::contract::{Decision, InputDecl, OutputDecl, Signature, StageContext, StageError};
use crate::metrics::agreement::{
    cohen_kappa, exact_match, set_precision_recall, summary, token_f1,
};
use crate::oracle::{self, Budget, LabelStats, Labelled, Oracle};
use crate::params::ParamError;

/// A reply field and the record field holding its gold value.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldGold {
    /// Field of the oracle's reply.
    pub field: String,
    /// Field of the record with the gold value (string or list of strings).
    pub gold: String,
}

/// A numeric reply field whose distribution is reported per stratum.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreField {
    /// Field of the oracle's reply.
    pub field: String,
}

/// What to compare.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compare {
    /// Free-text answer vs gold answers: `answer_em`, `answer_f1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<FieldGold>,
    /// Cited chunk ids vs supporting chunk ids: `citation_precision`, `citation_recall`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub citations: Option<FieldGold>,
    /// A class label vs the gold label: `label_agreement`, `label_kappa`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<FieldGold>,
    /// A number: `score_mean` and distributions per stratum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<ScoreField>,
    /// A multi-dimensional rubric (a filter file): the overall score of each reply by the
    /// filter, judged by the decision matrix on on-topic and off-topic strata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterCompare>,
}

/// The rubric comparison: which strata are on-topic and off-topic (the rest, e.g.
/// edge cases, are reported but not judged) and the decision matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterCompare {
    /// The filter file (relative to the workdir).
    pub file: String,
    /// Strata whose items should score high.
    pub on_topic: Vec<String>,
    /// Strata whose items should score low.
    pub off_topic: Vec<String>,
    /// Thresholds of the decision matrix.
    #[serde(default)]
    pub matrix: super::score_gate::ScoreGate,
}

/// The metrics the rubric comparison adds.
pub(super) const FILTER_METRICS: [&str; 5] = [
    "false_positive_rate",
    "strong_false_positive_rate",
    "false_negative_rate",
    "mean_dimension_variance",
    "overall_mean",
];

impl Compare {
    fn metric_names(&self) -> Vec<&'static str> {
        let mut m = vec!["parse_failure_rate", "failure_rate", "cost_usd"];
        if self.answer.is_some() {
            m.extend(["answer_em", "answer_f1"]);
        }
        if self.citations.is_some() {
            m.extend(["citation_precision", "citation_recall"]);
        }
        if self.label.is_some() {
            m.extend(["label_agreement", "label_kappa"]);
        }
        if self.score.is_some() {
            m.push("score_mean");
        }
        if self.filter.is_some() {
            m.extend(FILTER_METRICS);
        }
        m
    }
}

/// The stratified sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSpec {
    /// Record field whose values are the strata (none: one stratum `all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Items per stratum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_stratum: Option<usize>,
    /// Items of each named stratum (overrides `per_stratum` for those).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, usize>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: u64,
}

/// A threshold like `>= 0.6`.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    op: &'static str,
    value: f64,
}

impl Threshold {
    /// Parses `>= x`, `> x`, `<= x`, `< x`, `== x`.
    pub fn parse(s: &str) -> Result<Threshold, String> {
        let t = s.trim();
        for op in [">=", "<=", "==", ">", "<"] {
            if let Some(rest) = t.strip_prefix(op) {
                let value = rest
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| format!("`{s}`: expected a number after `{op}`"))?;
                return Ok(Threshold { op, value });
            }
        }
        Err(format!(
            "`{s}`: expected `>= N`, `> N`, `<= N`, `< N` or `== N`"
        ))
    }

    /// Whether `x` meets it.
    pub fn holds(&self, x: f64) -> bool {
        match self.op {
            ">=" => x >= self.value,
            "<=" => x <= self.value,
            ">" => x > self.value,
            "<" => x < self.value,
            _ => (x - self.value).abs() < 1e-12,
        }
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.op, self.value)
    }
}

pub(super) fn check_thresholds(
    field: &str,
    t: &BTreeMap<String, String>,
    compare: &Compare,
) -> Result<(), ParamError> {
    let names = compare.metric_names();
    for (k, v) in t {
        if !names.contains(&k.as_str()) {
            let mut e = ParamError::new(
                &[field, k],
                format!(
                    "unknown metric `{k}` for this `compare`; available: {}",
                    names.join(", ")
                ),
            );
            e.help = crate::params::suggest(k, names.iter().copied())
                .map(|s| format!("did you mean `{s}`?"));
            return Err(e);
        }
        Threshold::parse(v).map_err(|e| ParamError::new(&[field, k], e))?;
    }
    Ok(())
}

pub(super) fn check_sample(s: &SampleSpec) -> Result<(), ParamError> {
    if s.per_stratum.is_none() && s.counts.is_empty() {
        return Err(ParamError::new(
            &["sample"],
            "say how many items: `per_stratum: N` and/or `counts: {STRATUM: N}`",
        ));
    }
    Ok(())
}

pub(super) fn default_quote() -> usize {
    5
}

pub(super) fn signature(deps: Vec<String>) -> Signature {
    Signature {
        inputs: vec![InputDecl::required("corpus")],
        deps,
        outputs: vec![
            OutputDecl::staged("report", "report"),
            OutputDecl::staged("labels", "labels.jsonl"),
        ],
        ..Signature::default()
    }
}

/// What a gate compares and decides with; carried from calibrate to validate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct GateSetup {
    #[serde(skip, default)]
    pub(super) kind: &'static str,
    pub(super) compare: Compare,
    pub(super) pass_if: BTreeMap<String, String>,
    pub(super) review_if: BTreeMap<String, String>,
    pub(super) quote: usize,
    pub(super) id_field: String,
    #[serde(skip)]
    pub(super) max_cost_usd: Option<f64>,
}

/// One sampled item.
pub(super) struct Picked {
    pub(super) index: usize,
    pub(super) id: String,
    pub(super) stratum: String,
}

pub(super) fn field_str(r: &Value, path: &str) -> Option<String> {
    let mut cur = r;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) fn field_list(r: &Value, path: &str) -> Option<Vec<String>> {
    let mut cur = r;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    match cur {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

/// Seeded stratified sample, `exclude`d ids left out. Sorted by stratum, then draw order.
pub(super) fn draw(
    records: &[Value],
    s: &SampleSpec,
    id_field: &str,
    exclude: &BTreeSet<String>,
) -> Result<Vec<Picked>, StageError> {
    let mut strata: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (i, r) in records.iter().enumerate() {
        let id = field_str(r, id_field).ok_or_else(|| {
            StageError::Failed(format!(
                "corpus record {}: no `{id_field}` field (set `id_field`)",
                i + 1
            ))
        })?;
        if !seen.insert(id.clone()) {
            return Err(StageError::Failed(format!(
                "corpus record {}: duplicate {id_field} `{id}`; samples are tracked by id",
                i + 1
            )));
        }
        if exclude.contains(&id) {
            continue;
        }
        let stratum = match &s.by {
            Some(by) => field_str(r, by).unwrap_or_else(|| "(none)".into()),
            None => "all".into(),
        };
        strata.entry(stratum).or_default().push(i);
    }
    for name in s.counts.keys() {
        if !strata.contains_key(name) {
            return Err(StageError::Failed(format!(
                "sample.counts names stratum `{name}`, but no eligible record has {} = `{name}`; strata: {}",
                s.by.as_deref().unwrap_or("(none)"),
                strata.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
    }
    let mut out = Vec::new();
    for (k, (name, mut idx)) in strata.into_iter().enumerate() {
        let want = s.counts.get(&name).copied().or(s.per_stratum).unwrap_or(0);
        let mut rng = pipe_train::Rng::new(s.seed).fork(k as u64);
        rng.shuffle(&mut idx);
        for &i in idx.iter().take(want) {
            out.push(Picked {
                index: i,
                id: field_str(&records[i], id_field).expect("checked"),
                stratum: name.clone(),
            });
        }
    }
    if out.is_empty() {
        return Err(StageError::Failed(
            "the sample is empty: no eligible records (all used by the calibration sample?)".into(),
        ));
    }
    Ok(out)
}

pub(super) fn label_sample(
    ctx: &StageContext,
    oracle: &Oracle,
    records: &[Value],
    sample: &[Picked],
    max_cost: Option<f64>,
) -> Result<(Vec<Labelled>, LabelStats, f64), StageError> {
    let picked: Vec<Value> = sample.iter().map(|p| records[p.index].clone()).collect();
    let budget = Budget::new(
        max_cost,
        oracle.spec.prices.clone(),
        oracle::spent_so_far(&ctx.checkpoint_dir),
    );
    let mut stats = LabelStats::default();
    ctx.progress(0, Some(picked.len() as u64), "asking the oracle");
    let labels =
        oracle.label_in_chunks(ctx, &picked, 16, &budget, &mut stats, |_, st, spent| {
            format!("{} asked, ${spent:.4}", st.asked)
        })?;
    Ok((labels, stats, budget.spent()))
}

pub(super) struct Measured {
    pub(super) metrics: BTreeMap<String, f64>,
    pub(super) per_stratum: BTreeMap<String, BTreeMap<String, f64>>,
    pub(super) scores: BTreeMap<String, Value>,
    /// (item score, sample position) — lowest first.
    pub(super) worst: Vec<(f64, usize)>,
}

/// Loads `compare.filter`'s file and checks that the oracle returns every dimension.
pub(super) fn load_filter(
    ctx: &StageContext,
    compare: &Compare,
    returns: &BTreeMap<String, String>,
) -> Result<Option<crate::task::filter::Filter>, StageError> {
    let Some(fc) = &compare.filter else {
        return Ok(None);
    };
    let f = crate::task::filter::Filter::load(&ctx.workdir.join(&fc.file))
        .map_err(|e| StageError::Failed(format!("with.compare.filter: {e}")))?;
    for n in f.names() {
        if !returns.contains_key(n) {
            return Err(StageError::Failed(format!(
                "with.compare.filter: dimension `{n}` of {} is not among the oracle's `returns`; declare `{n}: int[0,10]`",
                fc.file
            )));
        }
    }
    Ok(Some(f))
}

/// The rubric comparison's rates and decision from measured metrics.
pub(super) fn filter_decision(
    compare: &Compare,
    metrics: &BTreeMap<String, f64>,
) -> Option<(Decision, Vec<String>)> {
    let fc = compare.filter.as_ref()?;
    let get = |k: &str| metrics.get(k).copied().unwrap_or(f64::NAN);
    let r = super::score_gate::ScoreRates {
        false_positive_rate: get("false_positive_rate"),
        strong_false_positive_rate: get("strong_false_positive_rate"),
        false_negative_rate: get("false_negative_rate"),
        mean_dimension_variance: get("mean_dimension_variance"),
    };
    Some(super::score_gate::decide(&r, &fc.matrix))
}

/// The more severe of two decisions, with both sets of reasons.
pub(super) fn combine(
    a: (Decision, Vec<String>),
    b: Option<(Decision, Vec<String>)>,
) -> (Decision, Vec<String>) {
    let rank = |d: Decision| match d {
        Decision::Pass => 0,
        Decision::Review => 1,
        Decision::Fail => 2,
    };
    match b {
        None => a,
        Some((d, mut r)) => {
            let mut reasons = a.1;
            reasons.append(&mut r);
            (if rank(d) > rank(a.0) { d } else { a.0 }, reasons)
        }
    }
}

pub(super) fn measure(
    setup: &GateSetup,
    records: &[Value],
    sample: &[Picked],
    labels: &[Labelled],
    filter: Option<&crate::task::filter::Filter>,
) -> Measured {
    #[derive(Default)]
    struct Acc {
        n: f64,
        parse_fail: f64,
        fail: f64,
        cost: f64,
        em: Vec<f64>,
        f1: Vec<f64>,
        cp: Vec<f64>,
        cr: Vec<f64>,
        gold_labels: Vec<String>,
        pred_labels: Vec<String>,
        scores: Vec<f64>,
    }
    let mut all = Acc::default();
    let mut by: BTreeMap<String, Acc> = BTreeMap::new();
    let mut item_score = Vec::with_capacity(sample.len());
    for (p, l) in sample.iter().zip(labels) {
        let r = &records[p.index];
        let reply = l.label.as_ref();
        let mut worst = 1.0f64;
        for acc in [&mut all, by.entry(p.stratum.clone()).or_default()] {
            acc.n += 1.0;
            acc.cost += l.cost_usd;
            if reply.is_none() {
                acc.fail += 1.0;
                if !l.request_failed {
                    acc.parse_fail += 1.0;
                }
            }
            if let Some(c) = &setup.compare.answer {
                if let Some(gold) = field_list(r, &c.gold).filter(|g| !g.is_empty()) {
                    let pred = reply.and_then(|v| v.get(&c.field)).and_then(Value::as_str);
                    let (em, f1) = match pred {
                        Some(p) => (exact_match(p, &gold), token_f1(p, &gold)),
                        None => (0.0, 0.0),
                    };
                    acc.em.push(em);
                    acc.f1.push(f1);
                    worst = worst.min(f1);
                }
            }
            if let Some(c) = &setup.compare.citations {
                if let Some(gold) = field_list(r, &c.gold).filter(|g| !g.is_empty()) {
                    let (pr, rc) = match reply.and_then(|v| field_list(v, &c.field)) {
                        Some(pred) => set_precision_recall(&pred, &gold),
                        None => (0.0, 0.0),
                    };
                    acc.cp.push(pr);
                    acc.cr.push(rc);
                    worst = worst.min(rc);
                }
            }
            if let Some(c) = &setup.compare.label {
                if let Some(gold) = field_list(r, &c.gold).and_then(|g| g.into_iter().next()) {
                    let pred = reply
                        .and_then(|v| field_str(v, &c.field))
                        .unwrap_or_else(|| "(no reply)".into());
                    let agree = pred.eq_ignore_ascii_case(&gold);
                    worst = worst.min(if agree { 1.0 } else { 0.0 });
                    acc.gold_labels.push(gold.to_uppercase());
                    acc.pred_labels.push(pred.to_uppercase());
                }
            }
            if let Some(c) = &setup.compare.score {
                if let Some(x) = reply.and_then(|v| v.get(&c.field)).and_then(Value::as_f64) {
                    acc.scores.push(x);
                }
            }
        }
        if reply.is_none() {
            worst = -1.0;
        }
        item_score.push(worst);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let finish = |a: &Acc| {
        let mut m = BTreeMap::new();
        m.insert("items".to_string(), a.n);
        m.insert("parse_failure_rate".into(), a.parse_fail / a.n.max(1.0));
        m.insert("failure_rate".into(), a.fail / a.n.max(1.0));
        m.insert("cost_usd".into(), a.cost);
        if !a.em.is_empty() {
            m.insert("answer_em".into(), mean(&a.em));
            m.insert("answer_f1".into(), mean(&a.f1));
        }
        if !a.cp.is_empty() {
            m.insert("citation_precision".into(), mean(&a.cp));
            m.insert("citation_recall".into(), mean(&a.cr));
        }
        if !a.gold_labels.is_empty() {
            let agree = a
                .gold_labels
                .iter()
                .zip(&a.pred_labels)
                .filter(|(x, y)| x == y)
                .count() as f64;
            m.insert("label_agreement".into(), agree / a.gold_labels.len() as f64);
            m.insert(
                "label_kappa".into(),
                cohen_kappa(&a.gold_labels, &a.pred_labels),
            );
        }
        if !a.scores.is_empty() {
            m.insert("score_mean".into(), mean(&a.scores));
        }
        m
    };
    let mut scores = BTreeMap::new();
    if setup.compare.score.is_some() {
        scores.insert("all".to_string(), summary(&all.scores));
        for (k, a) in &by {
            scores.insert(k.clone(), summary(&a.scores));
        }
    }
    let mut metrics = finish(&all);
    let mut per_stratum: BTreeMap<String, BTreeMap<String, f64>> =
        by.iter().map(|(k, a)| (k.clone(), finish(a))).collect();
    if let (Some(fc), Some(f)) = (&setup.compare.filter, filter) {
        let (mut on, mut off, mut dims, mut overall) = (vec![], vec![], vec![], vec![]);
        let mut by_stratum: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for (i, (p, l)) in sample.iter().zip(labels).enumerate() {
            let Some(reply) = &l.label else { continue };
            let Ok((scores, ct)) = f.read_reply(reply) else {
                item_score[i] = -1.0;
                continue;
            };
            let a = f.assess(&scores, ct.as_deref());
            if fc.on_topic.contains(&p.stratum) {
                on.push(a.overall);
                // An on-topic item scored low is one to look at.
                item_score[i] = item_score[i].min(a.overall / 10.0);
            }
            if fc.off_topic.contains(&p.stratum) {
                off.push(a.overall);
                item_score[i] = item_score[i].min(1.0 - a.overall / 10.0);
            }
            by_stratum
                .entry(p.stratum.as_str())
                .or_default()
                .push(a.overall);
            overall.push(a.overall);
            dims.push(scores);
        }
        let r = super::score_gate::rates(&off, &on, &dims, &fc.matrix);
        metrics.insert("false_positive_rate".into(), r.false_positive_rate);
        metrics.insert(
            "strong_false_positive_rate".into(),
            r.strong_false_positive_rate,
        );
        metrics.insert("false_negative_rate".into(), r.false_negative_rate);
        metrics.insert("mean_dimension_variance".into(), r.mean_dimension_variance);
        metrics.insert("overall_mean".into(), mean(&overall));
        for (k, v) in by_stratum {
            if let Some(m) = per_stratum.get_mut(k) {
                m.insert("overall_mean".into(), mean(&v));
            }
        }
    }
    let mut worst: Vec<(f64, usize)> = item_score
        .iter()
        .copied()
        .enumerate()
        .map(|(i, s)| (s, i))
        .filter(|(s, _)| *s < 1.0)
        .collect();
    worst.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    Measured {
        metrics,
        per_stratum,
        scores,
        worst,
    }
}

/// PASS when every `pass_if` holds; REVIEW when every `review_if` holds (and there is
/// one); FAIL otherwise. Reasons name each missed threshold.
pub(super) fn decide(
    metrics: &BTreeMap<String, f64>,
    pass_if: &BTreeMap<String, String>,
    review_if: &BTreeMap<String, String>,
) -> (Decision, Vec<String>) {
    let misses = |t: &BTreeMap<String, String>| -> Vec<String> {
        t.iter()
            .filter_map(|(k, v)| {
                let th = Threshold::parse(v).ok()?;
                match metrics.get(k) {
                    Some(x) if th.holds(*x) => None,
                    Some(x) => Some(format!("{k} = {x:.3}, needs {th}")),
                    None => Some(format!(
                        "{k} could not be computed (no sampled record has its gold field)"
                    )),
                }
            })
            .collect()
    };
    let pass_miss = misses(pass_if);
    if pass_miss.is_empty() {
        return (Decision::Pass, vec![]);
    }
    if !review_if.is_empty() && misses(review_if).is_empty() {
        return (Decision::Review, pass_miss);
    }
    let mut reasons = pass_miss;
    if !review_if.is_empty() {
        reasons.extend(
            misses(review_if)
                .into_iter()
                .map(|m| format!("review: {m}")),
        );
    }
    (Decision::Fail, reasons)
}

pub(super) fn excerpt(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ⏎ ");
    if one_line.chars().count() > n {
        format!("{}…", one_line.chars().take(n).collect::<String>())
    } else {
        one_line
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn thresholds_and_decisions() {
        let t = Threshold::parse(">= 0.6").unwrap();
        assert!(t.holds(0.6) && !t.holds(0.59));
        assert!(Threshold::parse("at least 3").is_err());
        let m: BTreeMap<String, f64> = [
            ("answer_f1".to_string(), 0.5),
            ("parse_failure_rate".to_string(), 0.0),
        ]
        .into();
        let pass: BTreeMap<String, String> =
            [("answer_f1".to_string(), ">= 0.6".to_string())].into();
        let review: BTreeMap<String, String> =
            [("answer_f1".to_string(), ">= 0.45".to_string())].into();
        assert_eq!(decide(&m, &pass, &review).0, Decision::Review);
        assert_eq!(decide(&m, &pass, &BTreeMap::new()).0, Decision::Fail);
        let strict: BTreeMap<String, String> =
            [("answer_f1".to_string(), ">= 0.55".to_string())].into();
        assert_eq!(decide(&m, &pass, &strict).0, Decision::Fail);
        let (d, reasons) = decide(&m, &pass, &strict);
        assert_eq!(d, Decision::Fail);
        assert!(
            reasons[0].contains("answer_f1 = 0.500, needs >= 0.6"),
            "{reasons:?}"
        );
        let low: BTreeMap<String, String> =
            [("answer_f1".to_string(), ">= 0.5".to_string())].into();
        assert_eq!(decide(&m, &low, &review), (Decision::Pass, vec![]));
    }

    #[test]
    fn stratified_sample_is_seeded_and_disjoint() {
        let records: Vec<Value> = (0..30)
            .map(|i| json!({"id": format!("r{i}"), "source": if i % 3 == 0 { "a" } else { "b" }}))
            .collect();
        let spec = SampleSpec {
            by: Some("source".into()),
            per_stratum: Some(4),
            counts: [("a".to_string(), 3)].into(),
            seed: 1,
        };
        let s1 = draw(&records, &spec, "id", &BTreeSet::new()).unwrap();
        let s2 = draw(&records, &spec, "id", &BTreeSet::new()).unwrap();
        assert_eq!(
            s1.iter().map(|p| &p.id).collect::<Vec<_>>(),
            s2.iter().map(|p| &p.id).collect::<Vec<_>>()
        );
        assert_eq!(s1.iter().filter(|p| p.stratum == "a").count(), 3);
        assert_eq!(s1.iter().filter(|p| p.stratum == "b").count(), 4);
        let used: BTreeSet<String> = s1.iter().map(|p| p.id.clone()).collect();
        let fresh = draw(
            &records,
            &SampleSpec {
                seed: 2,
                ..spec.clone()
            },
            "id",
            &used,
        )
        .unwrap();
        assert!(fresh.iter().all(|p| !used.contains(&p.id)));
        let bad = SampleSpec {
            counts: [("zzz".to_string(), 1)].into(),
            ..spec
        };
        assert!(draw(&records, &bad, "id", &BTreeSet::new()).is_err());
    }
}
