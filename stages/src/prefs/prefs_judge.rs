//! `prefs_judge`: a judge (any oracle backend) scores every candidate of
//! `prefs_generate` with a rubric template; per prompt the best and the worst
//! candidate form a pair when their score margin is at least `min_margin`.
//!
//! The judge template sees the record's fields plus `candidate` (the text) and
//! `candidate_model`; its declared reply must hold the numeric `score_field` (and
//! `rationale_field` when set). With `both_orders`, each kept pair is also judged
//! pairwise by `pair_template` (variables: the record, `answer_a`, `answer_b`; reply
//! `{"winner": "A" | "B"}`) once with the chosen answer first and once second: the
//! stats report how often the first position wins and how often both orders agree,
//! and pairs whose two verdicts disagree with the scores are dropped.
//!
//! With `schema_check`, a candidate that fails the answer schema (see
//! [`crate::task::factuality`]) scores 0 without a judge call.
//!
//! Judgements go through the oracle layer, so they are memoised per item, retried
//! when malformed and budgeted (`max_cost_usd`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::oracle::{self, Budget, LabelStats, Oracle, OracleSpec};
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefsJudgeParams {
    judge: Value,
    #[serde(default = "default_score")]
    score_field: String,
    #[serde(default)]
    rationale_field: Option<String>,
    #[serde(default)]
    min_margin: f64,
    #[serde(default)]
    both_orders: bool,
    #[serde(default)]
    pair_template: Option<String>,
    #[serde(default)]
    max_cost_usd: Option<f64>,
    /// Score candidates that fail the answer schema (not JSON, unknown chunk ids) 0
    /// without asking the judge.
    #[serde(default)]
    schema_check: bool,
}

fn default_score() -> String {
    "score".into()
}

/// Judged preference pairs with margin filtering and a position-bias check.
pub struct PrefsJudgeStage;

/// The best and worst of `scores` when `best − worst ≥ min_margin` (ties broken by the
/// lower index, so the result is deterministic): `(best, worst, margin)`.
pub fn best_worst(scores: &[(usize, f64)], min_margin: f64) -> Option<(usize, usize, f64)> {
    if scores.len() < 2 {
        return None;
    }
    let mut best = scores[0];
    let mut worst = scores[0];
    for &s in &scores[1..] {
        if s.1 > best.1 {
            best = s;
        }
        if s.1 < worst.1 {
            worst = s;
        }
    }
    let margin = best.1 - worst.1;
    (best.0 != worst.0 && margin > 0.0 && margin >= min_margin).then_some((best.0, worst.0, margin))
}

impl Stage for PrefsJudgeStage {
    fn kind(&self) -> &'static str {
        "prefs_judge"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "a judge scores candidates with a rubric; best vs worst pairs kept when the margin ≥ min_margin; optional both-orders position-bias check"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: PrefsJudgeParams = parse_params(params)?;
        let spec = OracleSpec::from_value(&p.judge, "judge")?;
        if spec.returns.get(&p.score_field).map(String::as_str) != Some("number") {
            return Err(ParamError::new(
                &["judge", "returns"],
                format!(
                    "the judge must return a number `{}` (`score_field`)",
                    p.score_field
                ),
            ));
        }
        if let Some(r) = &p.rationale_field {
            if !spec.returns.contains_key(r) {
                return Err(ParamError::new(
                    &["rationale_field"],
                    format!("`{r}` is not among the judge's `returns`"),
                ));
            }
        }
        let mut deps = spec.deps();
        match (&p.pair_template, p.both_orders) {
            (Some(t), _) => deps.push(t.clone()),
            (None, true) => return Err(ParamError::new(
                &["pair_template"],
                "`both_orders: true` needs a `pair_template` (reply `{\"winner\": \"A\"|\"B\"}`)",
            )),
            (None, false) => {}
        }
        Ok(Signature {
            inputs: vec![InputDecl::required("candidates")],
            deps,
            outputs: vec![
                OutputDecl::staged("pairs", "pairs.jsonl"),
                OutputDecl::staged("judgements", "judgements.jsonl"),
                OutputDecl::staged("stats", "stats.json"),
            ],
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        oracle::stage_key(params, "judge")
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: PrefsJudgeParams = parse_params(&ctx.params)?;
        let spec = OracleSpec::from_value(&p.judge, "judge")?;
        let rows = crate::records::read_jsonl(ctx.input("candidates")?)?;
        let judge = Oracle::open(&spec, ctx)?;
        let budget = Budget::new(
            p.max_cost_usd,
            spec.prices.clone(),
            oracle::spent_so_far(&ctx.checkpoint_dir),
        );
        let mut stats = LabelStats::default();
        // One judge item per candidate.
        let mut items = Vec::new();
        let mut owner = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let record = row.get("record").cloned().unwrap_or(Value::Null);
            let cands = row
                .get("candidates")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    StageError::Failed(format!(
                        "candidates row {}: no `candidates` list (bind a prefs_generate output)",
                        i + 1
                    ))
                })?;
            for (k, c) in cands.iter().enumerate() {
                let mut item = record.as_object().cloned().unwrap_or_default();
                item.insert(
                    "candidate".into(),
                    c.get("text").cloned().unwrap_or(Value::Null),
                );
                item.insert(
                    "candidate_model".into(),
                    c.get("model").cloned().unwrap_or(Value::Null),
                );
                items.push(Value::Object(item));
                owner.push((i, k));
            }
        }
        // Schema failures are scored without the judge.
        let schema_error: Vec<Option<String>> = items
            .iter()
            .map(|it| {
                if !p.schema_check {
                    return None;
                }
                let ids: Vec<String> = it["evidence"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|c| c["id"].as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                match crate::task::factuality::check_answer(
                    it["candidate"].as_str().unwrap_or(""),
                    &ids,
                ) {
                    Err(e) => Some(e),
                    Ok(a) if !a.unknown_citations.is_empty() => {
                        Some(format!("unknown chunk ids {:?}", a.unknown_citations))
                    }
                    Ok(_) => None,
                }
            })
            .collect();
        let to_judge: Vec<Value> = items
            .iter()
            .zip(&schema_error)
            .filter(|(_, e)| e.is_none())
            .map(|(it, _)| it.clone())
            .collect();
        let mut judged = ask(ctx, &judge, &to_judge, &budget, &mut stats)?.into_iter();
        let labels: Vec<oracle::Labelled> = schema_error
            .iter()
            .map(|e| match e {
                None => judged.next().expect("one judgement per judged item"),
                Some(why) => oracle::Labelled {
                    label: Some(json!({ p.score_field.clone(): 0.0 })),
                    raw: None,
                    errors: vec![format!("schema: {why}")],
                    attempts: 0,
                    asked: 0,
                    cost_usd: 0.0,
                    request_failed: false,
                },
            })
            .collect();
        let schema_failures = schema_error.iter().filter(|e| e.is_some()).count();
        let mut scores: Vec<Vec<(usize, f64)>> = vec![Vec::new(); rows.len()];
        let mut judgements = String::new();
        let mut failed = 0usize;
        for ((i, k), l) in owner.iter().zip(&labels) {
            let score = l
                .label
                .as_ref()
                .and_then(|v| v.get(&p.score_field))
                .and_then(Value::as_f64);
            match score {
                Some(s) => scores[*i].push((*k, s)),
                None => failed += 1,
            }
            judgements.push_str(&json!({"row": i, "candidate": k, "score": score, "reply": l.label, "errors": l.errors}).to_string());
            judgements.push('\n');
        }
        let mut pairs = Vec::new();
        let mut below_margin = 0usize;
        for (i, s) in scores.iter().enumerate() {
            match best_worst(s, p.min_margin) {
                Some(pw) => pairs.push((i, pw)),
                None if s.len() >= 2 => below_margin += 1,
                None => {}
            }
        }
        // Position-bias check.
        let mut bias = Value::Null;
        let mut inconsistent = std::collections::BTreeSet::new();
        if p.both_orders {
            let pair_template_path = ctx
                .workdir
                .join(p.pair_template.as_deref().expect("declared"));
            let text = std::fs::read_to_string(&pair_template_path).map_err(StageError::io(
                format!("reading {}", pair_template_path.display()),
            ))?;
            let mut pspec = spec.clone();
            pspec.template = p.pair_template.clone().expect("declared");
            pspec.returns = [("winner".to_string(), "enum[A,B]".to_string())].into();
            if spec.reply_prefix.is_some() {
                // The judge is prefilled (a model that honours it): prefill the verdict too.
                pspec.reply_prefix = Some("{\"winner\": \"".into());
                pspec.reply_suffix = Some("\"}".into());
                pspec.stop = vec!["\"".into(), "\n".into()];
                pspec.max_new_tokens = pspec.max_new_tokens.min(4);
            }
            let pj = Oracle::with_template(&pspec, &text, ctx)?;
            let mut pitems = Vec::new();
            for (i, (best, worst, _)) in &pairs {
                let cands = rows[*i]["candidates"].as_array().expect("checked");
                let mut base = rows[*i]
                    .get("record")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                for (a, b) in [(best, worst), (worst, best)] {
                    base.insert("answer_a".into(), cands[*a]["text"].clone());
                    base.insert("answer_b".into(), cands[*b]["text"].clone());
                    pitems.push(Value::Object(base.clone()));
                }
            }
            let verdicts = ask(ctx, &pj, &pitems, &budget, &mut stats)?;
            let (mut first_wins, mut judged, mut agree) = (0usize, 0usize, 0usize);
            for (n, pair) in verdicts.chunks(2).enumerate() {
                let w = |l: &oracle::Labelled| {
                    l.label
                        .as_ref()
                        .and_then(|v| v["winner"].as_str().map(str::to_string))
                };
                let (w1, w2) = (w(&pair[0]), w(&pair[1]));
                for x in [&w1, &w2].into_iter().flatten() {
                    judged += 1;
                    if x == "A" {
                        first_wins += 1;
                    }
                }
                // Chosen is A in the first order, B in the second.
                let consistent = w1.as_deref() == Some("A") && w2.as_deref() == Some("B");
                if consistent {
                    agree += 1;
                } else {
                    inconsistent.insert(n);
                }
            }
            bias = json!({
                "pairs_checked": pairs.len(),
                "first_position_win_rate": if judged > 0 { first_wins as f64 / judged as f64 } else { 0.0 },
                "both_orders_agree_with_scores": if pairs.is_empty() { 0.0 } else { agree as f64 / pairs.len() as f64 },
                "dropped_inconsistent": inconsistent.len(),
            });
        }
        let mut out = String::new();
        let mut margins = Vec::new();
        for (n, (i, (best, worst, margin))) in pairs.iter().enumerate() {
            if inconsistent.contains(&n) {
                continue;
            }
            let row = &rows[*i];
            let cands = row["candidates"].as_array().expect("checked");
            let score_of = |k: usize| scores[*i].iter().find(|s| s.0 == k).map(|s| s.1);
            let rationale = |k: usize| {
                p.rationale_field.as_ref().and_then(|f| {
                    owner
                        .iter()
                        .position(|o| *o == (*i, k))
                        .and_then(|j| labels[j].label.as_ref())
                        .and_then(|v| v.get(f).cloned())
                })
            };
            let mut pair = json!({
                "id": row.get("id"), "record": row.get("record"),
                "chosen": cands[*best]["text"], "rejected": cands[*worst]["text"],
                "chosen_model": cands[*best]["model"], "rejected_model": cands[*worst]["model"],
                "chosen_score": score_of(*best), "rejected_score": score_of(*worst), "margin": margin,
            });
            if p.rationale_field.is_some() {
                pair["chosen_rationale"] = json!(rationale(*best));
                pair["rejected_rationale"] = json!(rationale(*worst));
            }
            out.push_str(&pair.to_string());
            out.push('\n');
            margins.push(*margin);
        }
        let max_margin = margins.iter().cloned().fold(0.0, f64::max);
        let mut histogram = vec![0usize; 10];
        for m in &margins {
            let b = if max_margin > 0.0 {
                ((m / max_margin) * 10.0).ceil() as usize
            } else {
                1
            };
            histogram[b.clamp(1, 10) - 1] += 1;
        }
        let summary = json!({
            "prompts": rows.len(),
            "candidates": items.len(),
            "judge_failures": failed,
            "schema_failures": schema_failures,
            "pairs_kept": margins.len(),
            "below_min_margin": below_margin,
            "min_margin": p.min_margin,
            "margin_histogram": {"max": max_margin, "bins": histogram},
            "position_bias": bias,
            "judge_requests": stats.asked,
            "memo_hits": stats.memo_hits,
            "cost_usd": budget.spent(),
        });
        for (name, body) in [
            ("pairs.jsonl", out),
            ("judgements.jsonl", judgements),
            (
                "stats.json",
                serde_json::to_string_pretty(&summary).expect("json"),
            ),
        ] {
            crate::fsio::write_atomic(&ctx.out_dir.join(name), body.as_bytes())
                .map_err(StageError::io(format!("writing {name}")))?;
        }
        let mut metrics = BTreeMap::new();
        for k in [
            "pairs_kept",
            "below_min_margin",
            "judge_failures",
            "schema_failures",
            "judge_requests",
            "memo_hits",
        ] {
            metrics.insert(k.to_string(), summary[k].clone());
        }
        if !bias.is_null() {
            metrics.insert(
                "first_position_win_rate".into(),
                bias["first_position_win_rate"].clone(),
            );
            metrics.insert(
                "both_orders_agree".into(),
                bias["both_orders_agree_with_scores"].clone(),
            );
        }
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}

fn ask(
    ctx: &StageContext,
    judge: &Oracle,
    items: &[Value],
    budget: &Budget,
    stats: &mut LabelStats,
) -> Result<Vec<oracle::Labelled>, StageError> {
    judge.label_in_chunks(ctx, items, 32, budget, stats, |done, _, _| {
        format!("{done} judged")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_margin_filtering() {
        let (b, w, m) = best_worst(&[(0, 0.9), (1, 0.2), (2, 0.5)], 0.5).unwrap();
        assert_eq!((b, w), (0, 1));
        assert!((m - 0.7).abs() < 1e-12);
        assert_eq!(
            best_worst(&[(0, 0.6), (1, 0.5)], 0.12),
            None,
            "margin 0.1 < 0.12"
        );
        assert_eq!(
            best_worst(&[(0, 0.6), (1, 0.48)], 0.12).map(|p| (p.0, p.1)),
            Some((0, 1))
        );
        assert_eq!(
            best_worst(&[(0, 0.5), (1, 0.5)], 0.0),
            None,
            "a tie is no preference"
        );
        assert_eq!(best_worst(&[(3, 0.5)], 0.0), None);
        // Ties for best or worst go to the lower index.
        assert_eq!(
            best_worst(&[(0, 0.9), (1, 0.9), (2, 0.1), (3, 0.1)], 0.1).map(|p| (p.0, p.1)),
            Some((0, 2))
        );
    }
}
