//! MedQA and BoolQ for the confidence-token workflow: questions whose gold answer is
//! an option letter or yes/no, with what the model must see (the options, the
//! passage) kept with the question, so that tagging, training and validation prompts
//! all show the same thing (the original's validation prompts dropped them).
//!
//! - MedQA (the 4/5-option JSONL): `question`, `options` {A..E → text}, `answer`
//!   (the option text), `answer_idx` (its letter), `meta_info`. `answer_idx` must be
//!   one of the options, and `answer`, when present, that option's text.
//! - BoolQ: `question`, `passage`, `answer` (a JSON boolean), `title`; or the
//!   SuperGLUE form with `label` (a boolean or 0/1) and `idx`.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::records::{jsonl_lines as jsonl, kind};

/// A record that could not be read: `file:line` and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reject {
    /// `file:line`.
    pub at: String,
    /// Why.
    pub reason: String,
}

fn field_str(v: &Value, k: &str) -> Result<String, String> {
    match v.get(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(format!("`{k}` is empty")),
        Some(other) => Err(format!("`{k}` must be a string, found {}", kind(other))),
        None => Err(format!("missing `{k}`")),
    }
}

/// A question with its gold answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChoiceQuestion {
    /// `medqa-LINE`, `boolq-LINE` or the SuperGLUE `idx`.
    pub id: String,
    /// `medqa` or `boolq`.
    pub dataset: String,
    /// The question.
    pub question: String,
    /// BoolQ's passage (and its title).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passage: Option<String>,
    /// MedQA's options in letter order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<(String, String)>,
    /// MedQA: the gold letter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer_idx: Option<String>,
    /// BoolQ: the gold answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<bool>,
}

impl ChoiceQuestion {
    /// The prompt the model sees, the same for tagging, training and validation.
    pub fn prompt(&self) -> String {
        match self.dataset.as_str() {
            "boolq" => format!(
                "{}\n\nQuestion: {}?\nAnswer yes or no.",
                self.passage.as_deref().unwrap_or_default(),
                self.question.trim_end_matches('?')
            ),
            _ => {
                let opts: Vec<String> = self
                    .options
                    .iter()
                    .map(|(l, t)| format!("{l}. {t}"))
                    .collect();
                format!(
                    "{}\n\n{}\nAnswer with the letter of the correct option.",
                    self.question,
                    opts.join("\n")
                )
            }
        }
    }

    /// The record as `sft`'s confidence task reads it (`dataset`, `answer` or
    /// `answer_idx`, `options` as an object) plus `id`, `question` and `prompt`.
    pub fn to_record(&self) -> Value {
        let mut v = serde_json::json!({
            "id": self.id, "dataset": self.dataset, "question": self.question,
            "prompt": self.prompt(),
        });
        if let Some(a) = self.answer {
            v["answer"] = a.into();
        }
        if let Some(l) = &self.answer_idx {
            v["answer_idx"] = l.clone().into();
            let opts: serde_json::Map<String, Value> = self
                .options
                .iter()
                .map(|(l, t)| (l.clone(), Value::String(t.clone())))
                .collect();
            v["options"] = Value::Object(opts);
        }
        v
    }
}

/// What a reader gives: good questions in file order, and rejects with `file:line`.
#[derive(Debug, Default)]
pub struct ChoiceRead {
    /// Good questions.
    pub questions: Vec<ChoiceQuestion>,
    /// Malformed records.
    pub rejects: Vec<Reject>,
}

impl ChoiceRead {
    fn push(&mut self, file: &Path, line: usize, r: Result<ChoiceQuestion, String>) {
        match r {
            Ok(q) => self.questions.push(q),
            Err(reason) => self.rejects.push(Reject {
                at: format!("{}:{line}", file.display()),
                reason,
            }),
        }
    }
}

/// MedQA JSONL.
pub fn medqa(file: &Path, text: &str) -> ChoiceRead {
    let mut out = ChoiceRead::default();
    for (line, v) in jsonl(text) {
        let r = v.and_then(|v| {
            let question = field_str(&v, "question")?;
            let opts = match v.get("options") {
                Some(Value::Object(m)) if !m.is_empty() => m,
                Some(other) => {
                    return Err(format!(
                        "`options` must be an object of letter → text, found {}",
                        kind(other)
                    ))
                }
                None => return Err("missing `options`".into()),
            };
            let mut options = Vec::new();
            for (l, t) in opts {
                let t = t
                    .as_str()
                    .filter(|t| !t.trim().is_empty())
                    .ok_or_else(|| format!("option `{l}` must be a non-empty string"))?;
                options.push((l.clone(), t.to_string()));
            }
            options.sort();
            let idx = field_str(&v, "answer_idx")?;
            let Some((_, text)) = options.iter().find(|(l, _)| *l == idx) else {
                return Err(format!(
                    "`answer_idx` `{idx}` is not among the options ({})",
                    options
                        .iter()
                        .map(|o| o.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            if let Some(a) = v.get("answer").and_then(Value::as_str) {
                if a.trim() != text.trim() {
                    return Err(format!(
                        "`answer` \"{a}\" is not the text of option {idx} (\"{text}\")"
                    ));
                }
            }
            Ok(ChoiceQuestion {
                id: format!("medqa-{line}"),
                dataset: "medqa".into(),
                question,
                passage: None,
                options,
                answer_idx: Some(idx),
                answer: None,
            })
        });
        out.push(file, line, r);
    }
    out
}

/// BoolQ JSONL (the original or the SuperGLUE form).
pub fn boolq(file: &Path, text: &str) -> ChoiceRead {
    let mut out = ChoiceRead::default();
    for (line, v) in jsonl(text) {
        let r = v.and_then(|v| {
            let question = field_str(&v, "question")?;
            let passage = field_str(&v, "passage")?;
            let answer = match (v.get("answer"), v.get("label")) {
                (Some(Value::Bool(b)), _) => *b,
                (Some(other), _) => {
                    return Err(format!(
                        "`answer` must be a boolean (true/false), found {}",
                        match other {
                            Value::String(s) => format!("the string \"{s}\""),
                            o => kind(o).to_string(),
                        }
                    ))
                }
                (None, Some(Value::Bool(b))) => *b,
                (None, Some(Value::Number(n))) if n.as_u64() == Some(0) => false,
                (None, Some(Value::Number(n))) if n.as_u64() == Some(1) => true,
                (None, Some(other)) => {
                    return Err(format!("`label` must be a boolean or 0/1, found {other}"))
                }
                (None, None) => return Err("missing `answer` (or SuperGLUE's `label`)".into()),
            };
            let id = match v.get("idx") {
                Some(i) if !i.is_null() => format!("boolq-{i}"),
                _ => format!("boolq-{line}"),
            };
            let title = v.get("title").and_then(Value::as_str).unwrap_or_default();
            Ok(ChoiceQuestion {
                id,
                dataset: "boolq".into(),
                question,
                passage: Some(if title.is_empty() {
                    passage
                } else {
                    format!("{title}: {passage}")
                }),
                options: Vec::new(),
                answer_idx: None,
                answer: Some(answer),
            })
        });
        out.push(file, line, r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medqa_reads_good_records_and_rejects_bad_golds_with_their_line() {
        let text = [
            r#"{"question": "Which drug?", "options": {"A": "aspirin", "B": "warfarin"}, "answer": "warfarin", "answer_idx": "B", "meta_info": "step1"}"#,
            r#"{"question": "Which?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}"#,
            r#"{"question": "Which?", "options": {"A": "x", "B": "y"}, "answer": "x", "answer_idx": "B"}"#,
            r#"{"question": "Which?", "options": ["x", "y"], "answer_idx": "A"}"#,
            "not json",
        ]
        .join("\n");
        let r = medqa(Path::new("m.jsonl"), &text);
        assert_eq!(r.questions.len(), 1);
        let q = &r.questions[0];
        assert_eq!(q.answer_idx.as_deref(), Some("B"));
        assert!(
            q.prompt().contains("A. aspirin\nB. warfarin"),
            "{}",
            q.prompt()
        );
        assert_eq!(q.to_record()["options"]["B"], "warfarin");
        let at: Vec<&str> = r.rejects.iter().map(|j| j.at.as_str()).collect();
        assert_eq!(at, vec!["m.jsonl:2", "m.jsonl:3", "m.jsonl:4", "m.jsonl:5"]);
        assert!(r.rejects[0]
            .reason
            .contains("`E` is not among the options (A, B)"));
        assert!(r.rejects[1].reason.contains("not the text of option B"));
        assert!(r.rejects[2].reason.contains("must be an object"));
    }

    #[test]
    fn boolq_takes_both_forms_and_rejects_an_answer_that_is_not_a_bool() {
        let text = [
            r#"{"question": "is the sky blue", "passage": "It is.", "answer": true, "title": "Sky"}"#,
            r#"{"question": "is mud blue", "passage": "No.", "label": 0, "idx": 17}"#,
            r#"{"question": "is it", "passage": "p", "answer": "true"}"#,
            r#"{"question": "is it", "passage": "p", "label": 2}"#,
            r#"{"question": "is it", "passage": "p"}"#,
        ]
        .join("\n");
        let r = boolq(Path::new("b.jsonl"), &text);
        assert_eq!(r.questions.len(), 2);
        assert_eq!(r.questions[0].answer, Some(true));
        assert_eq!(r.questions[1].answer, Some(false));
        assert_eq!(r.questions[1].id, "boolq-17");
        assert!(r.questions[0].prompt().starts_with("Sky: It is."));
        assert!(r.questions[0]
            .prompt()
            .ends_with("Question: is the sky blue?\nAnswer yes or no."));
        let reasons: Vec<&str> = r.rejects.iter().map(|j| j.reason.as_str()).collect();
        assert_eq!(r.rejects[0].at, "b.jsonl:3");
        assert!(reasons[0].contains("must be a boolean (true/false), found the string \"true\""));
        assert!(reasons[1].contains("`label` must be a boolean or 0/1"));
        assert!(reasons[2].contains("missing `answer`"));
    }
}
