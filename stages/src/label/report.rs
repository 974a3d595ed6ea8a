//! The gate report: `report.md` (decision, reasons, metrics per stratum, the worst
//! disagreements quoted) and `report.json` (the same numbers plus the gate setup that
//! `validate` reads back), and the sampled items' labels, all written atomically.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::gate::{excerpt, FieldGold, GateSetup, Measured, Picked};
use crate::contract::{Decision, Gate, Outcome, StageContext, StageError};
use crate::oracle::{self, LabelStats, Labelled, Oracle};

#[allow(clippy::too_many_arguments)]
pub(super) fn finish(
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

pub(super) fn reasons_of(report: &Value) -> Vec<String> {
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

pub(super) fn markdown(
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
