//! `calibrate` and `validate`: gates that measure an oracle before it labels a
//! corpus.
//!
//! `calibrate` draws a seeded stratified sample (`per_stratum` items of each
//! value of `sample.by`, or `counts` per named stratum), has the oracle label
//! it, and compares the replies with gold where the records have it: exact
//! match and token F1 for answers, precision/recall for citations, agreement
//! and Cohen's kappa for labels, distributions per stratum for numeric scores,
//! plus parse-failure rate and cost. `pass_if` thresholds all met → PASS; else
//! `review_if` all met → REVIEW; else FAIL. The report (markdown + JSON, the
//! worst disagreements quoted) is the gate's output.
//!
//! `validate` repeats the measurement on a fresh sample (another seed, the
//! calibration items excluded) with the oracle, template and thresholds taken
//! from the calibration report, and also compares each thresholded metric with
//! its calibration value: a drift beyond `tolerance` turns a PASS into REVIEW
//! (the prompt was tuned to the calibration items).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::contract::{
    Decision, Gate, InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError,
};
use crate::oracle::metrics::{cohen_kappa, exact_match, set_precision_recall, summary, token_f1};
use crate::oracle::{self, Budget, LabelStats, Labelled, Oracle, OracleSpec};
use crate::params::{parse_params, ParamError};

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
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalibrateParams {
    oracle: Value,
    #[serde(default)]
    compare: Compare,
    sample: SampleSpec,
    pass_if: BTreeMap<String, String>,
    #[serde(default)]
    review_if: BTreeMap<String, String>,
    #[serde(default)]
    max_cost_usd: Option<f64>,
    #[serde(default = "default_quote")]
    quote: usize,
    #[serde(default = "default_id")]
    id_field: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateParams {
    sample: SampleSpec,
    #[serde(default = "default_tolerance")]
    tolerance: f64,
    #[serde(default)]
    pass_if: Option<BTreeMap<String, String>>,
    #[serde(default)]
    review_if: Option<BTreeMap<String, String>>,
    #[serde(default)]
    max_cost_usd: Option<f64>,
    #[serde(default = "default_quote")]
    quote: usize,
}

fn default_quote() -> usize {
    5
}
fn default_id() -> String {
    "id".into()
}
fn default_tolerance() -> f64 {
    0.05
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

fn check_thresholds(
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

fn check_sample(s: &SampleSpec) -> Result<(), ParamError> {
    if s.per_stratum.is_none() && s.counts.is_empty() {
        return Err(ParamError::new(
            &["sample"],
            "say how many items: `per_stratum: N` and/or `counts: {STRATUM: N}`",
        ));
    }
    Ok(())
}

/// The gate that measures an oracle on a stratified sample.
pub struct CalibrateStage;

/// The gate that re-measures it on a fresh sample.
pub struct ValidateStage;

impl Stage for CalibrateStage {
    fn kind(&self) -> &'static str {
        "calibrate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "gate: an oracle labels a seeded stratified sample, measured against gold → PASS / REVIEW / FAIL with a report"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: CalibrateParams = parse_params(params)?;
        let spec = OracleSpec::from_value(&p.oracle, "oracle")?;
        check_sample(&p.sample)?;
        if p.pass_if.is_empty() {
            return Err(ParamError::new(
                &["pass_if"],
                "a gate needs at least one `pass_if` threshold, e.g. `answer_f1: \">= 0.6\"`",
            ));
        }
        check_thresholds("pass_if", &p.pass_if, &p.compare)?;
        check_thresholds("review_if", &p.review_if, &p.compare)?;
        for (name, fg) in [
            ("answer", &p.compare.answer),
            ("citations", &p.compare.citations),
            ("label", &p.compare.label),
        ] {
            if let Some(fg) = fg {
                if !spec.returns.contains_key(&fg.field) {
                    return Err(ParamError::new(
                        &["compare", name, "field"],
                        format!(
                            "`{}` is not among the oracle's declared `returns`",
                            fg.field
                        ),
                    ));
                }
            }
        }
        Ok(signature(spec.deps()))
    }

    fn key_params(&self, params: &Value) -> Value {
        crate::oracle::stage_key(params, "oracle")
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: CalibrateParams = parse_params(&ctx.params)?;
        let spec = OracleSpec::from_value(&p.oracle, "oracle")?;
        let records = crate::ml::read_jsonl(ctx.input("corpus")?)?;
        let sample = draw(&records, &p.sample, &p.id_field, &BTreeSet::new())?;
        let oracle = Oracle::open(&spec, ctx)?;
        let template = std::fs::read_to_string(ctx.workdir.join(&spec.template))
            .map_err(StageError::io("reading the oracle template"))?;
        let setup = GateSetup {
            kind: "calibrate",
            compare: p.compare,
            pass_if: p.pass_if,
            review_if: p.review_if,
            quote: p.quote,
            id_field: p.id_field,
            max_cost_usd: p.max_cost_usd,
        };
        let (labels, stats, spent) = label_sample(ctx, &oracle, &records, &sample, p.max_cost_usd)?;
        let m = measure(&setup, &records, &sample, &labels);
        let (decision, reasons) = decide(&m.metrics, &setup.pass_if, &setup.review_if);
        let extra = json!({
            "oracle_spec": spec,
            "template_text": template,
            "sample_spec": p.sample,
        });
        finish(
            ctx, &setup, &oracle, &records, &sample, &labels, &m, decision, reasons, &stats, spent,
            extra, None,
        )
    }
}

impl Stage for ValidateStage {
    fn kind(&self) -> &'static str {
        "validate"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "gate: the calibrated oracle on a fresh disjoint sample, compared with calibration within a tolerance"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: ValidateParams = parse_params(params)?;
        check_sample(&p.sample)?;
        if !(0.0..=1.0).contains(&p.tolerance) {
            return Err(ParamError::new(
                &["tolerance"],
                "expected a number in [0, 1]",
            ));
        }
        let mut sig = signature(vec![]);
        sig.inputs.push(InputDecl::required("calibration"));
        Ok(sig)
    }

    fn key_params(&self, params: &Value) -> Value {
        crate::oracle::stage_key(params, "oracle")
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: ValidateParams = parse_params(&ctx.params)?;
        let cal_path = ctx.input("calibration")?;
        let cal_file = if cal_path.is_dir() {
            cal_path.join("report.json")
        } else {
            cal_path.to_path_buf()
        };
        let cal: Value = serde_json::from_slice(
            &std::fs::read(&cal_file)
                .map_err(StageError::io(format!("reading {}", cal_file.display())))?,
        )
        .map_err(|e| {
            StageError::Failed(format!(
                "{}: not a calibration report: {e}",
                cal_file.display()
            ))
        })?;
        let bad = |what: &str| {
            StageError::Failed(format!("{}: the calibration report lacks `{what}`; bind `calibration` to a calibrate stage's `report`", cal_file.display()))
        };
        let spec = OracleSpec::from_value(
            cal.get("oracle_spec").ok_or_else(|| bad("oracle_spec"))?,
            "oracle",
        )?;
        let template = cal
            .get("template_text")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("template_text"))?;
        let setup_v = cal.get("setup").ok_or_else(|| bad("setup"))?;
        let mut setup: GateSetup = serde_json::from_value(setup_v.clone())
            .map_err(|e| StageError::Failed(format!("{}: `setup`: {e}", cal_file.display())))?;
        setup.kind = "validate";
        if let Some(t) = p.pass_if {
            setup.pass_if = t;
        }
        if let Some(t) = p.review_if {
            setup.review_if = t;
        }
        setup.quote = p.quote;
        setup.max_cost_usd = p.max_cost_usd;
        check_thresholds("pass_if", &setup.pass_if, &setup.compare)?;
        check_thresholds("review_if", &setup.review_if, &setup.compare)?;
        let cal_ids: BTreeSet<String> = cal
            .get("sample_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let records = crate::ml::read_jsonl(ctx.input("corpus")?)?;
        let sample = draw(&records, &p.sample, &setup.id_field, &cal_ids)?;
        let oracle = Oracle::with_template(&spec, template, ctx)?;
        let (labels, stats, spent) = label_sample(ctx, &oracle, &records, &sample, p.max_cost_usd)?;
        let m = measure(&setup, &records, &sample, &labels);
        let (mut decision, mut reasons) = decide(&m.metrics, &setup.pass_if, &setup.review_if);
        let cal_metrics = cal.get("metrics").cloned().unwrap_or(Value::Null);
        let mut drift = BTreeMap::new();
        for name in setup.pass_if.keys() {
            if let (Some(now), Some(then)) = (
                m.metrics.get(name),
                cal_metrics.get(name).and_then(Value::as_f64),
            ) {
                let d = now - then;
                drift.insert(name.clone(), d);
                if d.abs() > p.tolerance {
                    reasons.push(format!(
                        "{name} {now:.3} vs {then:.3} at calibration: drift {d:+.3} beyond the tolerance {}",
                        p.tolerance
                    ));
                    if decision == Decision::Pass {
                        decision = Decision::Review;
                    }
                }
            }
        }
        let extra = json!({"calibration_metrics": cal_metrics, "tolerance": p.tolerance, "drift": drift, "excluded_calibration_items": cal_ids.len()});
        finish(
            ctx,
            &setup,
            &oracle,
            &records,
            &sample,
            &labels,
            &m,
            decision,
            reasons,
            &stats,
            spent,
            extra,
            Some(&drift),
        )
    }
}

fn signature(deps: Vec<String>) -> Signature {
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
struct GateSetup {
    #[serde(skip, default)]
    kind: &'static str,
    compare: Compare,
    pass_if: BTreeMap<String, String>,
    review_if: BTreeMap<String, String>,
    quote: usize,
    id_field: String,
    #[serde(skip)]
    max_cost_usd: Option<f64>,
}

/// One sampled item.
struct Picked {
    index: usize,
    id: String,
    stratum: String,
}

fn field_str(r: &Value, path: &str) -> Option<String> {
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

fn field_list(r: &Value, path: &str) -> Option<Vec<String>> {
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
fn draw(
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

fn label_sample(
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

struct Measured {
    metrics: BTreeMap<String, f64>,
    per_stratum: BTreeMap<String, BTreeMap<String, f64>>,
    scores: BTreeMap<String, Value>,
    /// (item score, sample position) — lowest first.
    worst: Vec<(f64, usize)>,
}

fn measure(
    setup: &GateSetup,
    records: &[Value],
    sample: &[Picked],
    labels: &[Labelled],
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
    let mut worst: Vec<(f64, usize)> = item_score
        .iter()
        .copied()
        .enumerate()
        .map(|(i, s)| (s, i))
        .filter(|(s, _)| *s < 1.0)
        .collect();
    worst.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    Measured {
        metrics: finish(&all),
        per_stratum: by.iter().map(|(k, a)| (k.clone(), finish(a))).collect(),
        scores,
        worst,
    }
}

/// PASS when every `pass_if` holds; REVIEW when every `review_if` holds (and there is
/// one); FAIL otherwise. Reasons name each missed threshold.
fn decide(
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

fn excerpt(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ⏎ ");
    if one_line.chars().count() > n {
        format!("{}…", one_line.chars().take(n).collect::<String>())
    } else {
        one_line
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    ctx: &StageContext,
    setup: &GateSetup,
    oracle: &Oracle,
    records: &[Value],
    sample: &[Picked],
    labels: &[Labelled],
    m: &Measured,
    decision: Decision,
    reasons: Vec<String>,
    stats: &LabelStats,
    spent: f64,
    extra: Value,
    drift: Option<&BTreeMap<String, f64>>,
) -> Result<Outcome, StageError> {
    let dir = ctx.out_dir.join("report");
    std::fs::create_dir_all(&dir).map_err(StageError::io("creating the report dir"))?;
    // Labels of the sample.
    let mut lines = String::new();
    for (p, l) in sample.iter().zip(labels) {
        lines.push_str(&json!({"id": p.id, "stratum": p.stratum, "label": l.label, "raw": l.raw, "errors": l.errors, "attempts": l.attempts, "cost_usd": l.cost_usd}).to_string());
        lines.push('\n');
    }
    crate::fsio::write_atomic(&ctx.out_dir.join("labels.jsonl"), lines.as_bytes())
        .map_err(StageError::io("writing labels.jsonl"))?;
    let mut strata: BTreeMap<&str, usize> = BTreeMap::new();
    for p in sample {
        *strata.entry(&p.stratum).or_default() += 1;
    }
    let worst: Vec<Value> = m
        .worst
        .iter()
        .take(setup.quote)
        .map(|&(score, i)| {
            let p = &sample[i];
            let r = &records[p.index];
            let gold = |fg: &Option<FieldGold>| fg.as_ref().and_then(|c| r.get(&c.gold)).cloned();
            json!({
                "id": p.id, "stratum": p.stratum, "item_score": score,
                "question": r.get("question").or_else(|| r.get("prompt")).cloned(),
                "gold_answer": gold(&setup.compare.answer),
                "gold_citations": gold(&setup.compare.citations),
                "gold_label": gold(&setup.compare.label),
                "reply": labels[i].label, "raw": labels[i].raw.as_deref().map(|s| excerpt(s, 400)),
                "errors": labels[i].errors,
            })
        })
        .collect();
    let report = json!({
        "kind": setup.kind,
        "decision": decision,
        "reasons": reasons,
        "oracle": oracle.describe(),
        "metrics": m.metrics,
        "per_stratum": m.per_stratum,
        "score_distributions": m.scores,
        "sample": {"items": sample.len(), "strata": strata},
        "sample_ids": sample.iter().map(|p| &p.id).collect::<Vec<_>>(),
        "requests": stats.asked,
        "memo_hits": stats.memo_hits,
        "spent_usd": spent,
        "setup": setup,
        "worst": worst,
    });
    let mut report = report;
    if let (Some(o), Some(e)) = (report.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    crate::fsio::write_json_atomic(&dir.join("report.json"), &report)
        .map_err(StageError::io("writing report.json"))?;
    let md = markdown(
        setup,
        oracle,
        &report,
        m,
        decision,
        &reasons_of(&report),
        drift,
    );
    crate::fsio::write_atomic(&dir.join("report.md"), md.as_bytes())
        .map_err(StageError::io("writing report.md"))?;
    ctx.log(&format!(
        "decision {}: {}",
        decision.as_str(),
        reasons_of(&report).join("; ")
    ));
    let mut metrics: BTreeMap<String, Value> = m
        .metrics
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    metrics.insert("decision".into(), json!(decision.as_str()));
    metrics.insert("requests".into(), json!(stats.asked));
    metrics.insert("memo_hits".into(), json!(stats.memo_hits));
    Ok(Outcome {
        metrics,
        gate: Some(Gate {
            decision,
            report: "report/report.md".into(),
            reasons: reasons_of(&report),
        }),
    })
}

fn reasons_of(report: &Value) -> Vec<String> {
    report
        .get("reasons")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn markdown(
    setup: &GateSetup,
    oracle: &Oracle,
    report: &Value,
    m: &Measured,
    decision: Decision,
    reasons: &[String],
    drift: Option<&BTreeMap<String, f64>>,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "# {} report: **{}**\n", setup.kind, decision.as_str());
    if reasons.is_empty() {
        let _ = writeln!(s, "Every `pass_if` threshold is met.\n");
    } else {
        for r in reasons {
            let _ = writeln!(s, "- {r}");
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "Oracle: `{:?}` `{}` (identity `{}`), template `{}` (`{}`), temperature {}, max_new_tokens {}.\n",
        oracle.spec.backend,
        oracle.spec.model,
        oracle::short(report["oracle"]["identity"].as_str().unwrap_or("")),
        oracle.spec.template,
        oracle::short(&oracle.task.template_digest),
        oracle.spec.temperature,
        oracle.spec.max_new_tokens
    );
    let _ = writeln!(
        s,
        "Sample: {} items ({}); {} requests, {} memoised replies reused, ${:.4} spent.\n",
        report["sample"]["items"],
        report["sample"]["strata"]
            .as_object()
            .map(|o| o
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        report["requests"],
        report["memo_hits"],
        report["spent_usd"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(
        s,
        "| metric | value | pass_if | review_if |{}",
        if drift.is_some() {
            " drift vs calibration |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|{}",
        if drift.is_some() { "---|" } else { "" }
    );
    for (k, v) in &m.metrics {
        let _ = write!(
            s,
            "| {k} | {v:.4} | {} | {} |",
            setup.pass_if.get(k).map(String::as_str).unwrap_or(""),
            setup.review_if.get(k).map(String::as_str).unwrap_or("")
        );
        if let Some(d) = drift {
            let _ = write!(
                s,
                " {} |",
                d.get(k).map(|x| format!("{x:+.4}")).unwrap_or_default()
            );
        }
        s.push('\n');
    }
    if m.per_stratum.len() > 1 {
        let names: BTreeSet<&String> = m.per_stratum.values().flat_map(|x| x.keys()).collect();
        let _ = writeln!(s, "\n## Per stratum\n");
        let _ = writeln!(
            s,
            "| stratum | {} |",
            names
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---|{}", "---|".repeat(names.len()));
        for (k, ms) in &m.per_stratum {
            let cells: Vec<String> = names
                .iter()
                .map(|n| ms.get(*n).map(|x| format!("{x:.3}")).unwrap_or_default())
                .collect();
            let _ = writeln!(s, "| {k} | {} |", cells.join(" | "));
        }
    }
    if !m.scores.is_empty() {
        let _ = writeln!(s, "\n## Score distributions\n");
        for (k, v) in &m.scores {
            let _ = writeln!(s, "- {k}: {v}");
        }
    }
    if let Some(w) = report["worst"].as_array().filter(|w| !w.is_empty()) {
        let _ = writeln!(s, "\n## Worst disagreements\n");
        for item in w {
            let _ = writeln!(
                s,
                "### `{}` ({})\n",
                item["id"].as_str().unwrap_or(""),
                item["stratum"].as_str().unwrap_or("")
            );
            if let Some(q) = item["question"].as_str() {
                let _ = writeln!(s, "> {}\n", excerpt(q, 300));
            }
            for (label, key) in [
                ("gold answer", "gold_answer"),
                ("gold citations", "gold_citations"),
                ("gold label", "gold_label"),
                ("parsed reply", "reply"),
            ] {
                if !item[key].is_null() {
                    let _ = writeln!(s, "- {label}: `{}`", item[key]);
                }
            }
            if let Some(r) = item["raw"].as_str() {
                let _ = writeln!(s, "- raw reply: `{}`", r.replace('`', "'"));
            }
            if let Some(e) = item["errors"].as_array().filter(|e| !e.is_empty()) {
                let _ = writeln!(
                    s,
                    "- errors: {}",
                    e.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
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
