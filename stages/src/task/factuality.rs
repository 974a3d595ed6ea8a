//! The answer format of the factuality pipeline and its validator. A model answers
//! `{"answer": str, "citations": [chunk ids], "confidence": 0..1}`, or refuses with
//! the answer "insufficient evidence" (any case, trailing punctuation ignored). The
//! JSON may be wrapped in prose or a code fence; the first balanced object is read.

use serde_json::Value;

/// The answer text that means "the evidence does not say".
pub const REFUSAL: &str = "insufficient evidence";

/// A parsed, checked answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedAnswer {
    /// The answer text (empty for a refusal that gave none).
    pub answer: String,
    /// Cited chunk ids, in order, duplicates removed.
    pub citations: Vec<String>,
    /// Cited ids that are not among the record's evidence chunks.
    pub unknown_citations: Vec<String>,
    /// Stated confidence in [0, 1].
    pub confidence: f64,
    /// The model declined to answer.
    pub refusal: bool,
}

/// Parses `text` and checks it against the ids of the evidence the model was shown.
pub fn check_answer(text: &str, evidence_ids: &[String]) -> Result<CheckedAnswer, String> {
    let obj = crate::prompt::first_object(text).ok_or("no JSON object in the output")?;
    let v: Value = serde_json::from_str(obj).map_err(|e| format!("invalid JSON: {e}"))?;
    let answer = v
        .get("answer")
        .and_then(Value::as_str)
        .ok_or("`answer` is missing or not a string")?
        .trim()
        .to_string();
    let refusal = answer
        .trim_end_matches(['.', '!'])
        .trim()
        .eq_ignore_ascii_case(REFUSAL);
    let mut citations: Vec<String> = Vec::new();
    match v.get("citations") {
        None | Some(Value::Null) if refusal => {}
        Some(Value::Array(items)) => {
            for c in items {
                let id = c.as_str().ok_or_else(|| {
                    format!("`citations` must hold chunk ids (strings), found {c}")
                })?;
                if !citations.iter().any(|x| x == id) {
                    citations.push(id.to_string());
                }
            }
        }
        _ => return Err("`citations` is missing or not a list".into()),
    }
    let confidence = v
        .get("confidence")
        .and_then(Value::as_f64)
        .ok_or("`confidence` is missing or not a number")?;
    if !(0.0..=1.0).contains(&confidence) {
        return Err(format!("`confidence` {confidence} is outside [0, 1]"));
    }
    let unknown_citations = citations
        .iter()
        .filter(|c| !evidence_ids.contains(c))
        .cloned()
        .collect();
    Ok(CheckedAnswer {
        answer,
        citations,
        unknown_citations,
        confidence,
        refusal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Vec<String> {
        vec!["c1".into(), "c2".into()]
    }

    #[test]
    fn valid_wrapped_refusal_and_unknown_ids() {
        let a = check_answer(
            "Here you go:\n```json\n{\"answer\": \"Vistula\", \"citations\": [\"c2\", \"c2\", \"c9\"], \"confidence\": 0.8}\n```",
            &ids(),
        )
        .unwrap();
        assert_eq!(a.answer, "Vistula");
        assert_eq!(a.citations, ["c2", "c9"]);
        assert_eq!(a.unknown_citations, ["c9"]);
        assert!(!a.refusal);
        let r = check_answer(
            "{\"answer\": \"Insufficient evidence.\", \"confidence\": 0.1}",
            &ids(),
        )
        .unwrap();
        assert!(r.refusal && r.citations.is_empty());
    }

    #[test]
    fn malformed_outputs_say_why() {
        let e = |t: &str| check_answer(t, &ids()).unwrap_err();
        assert!(e("Vistula").contains("no JSON object"));
        assert!(e("{\"answer\": \"x\", }").contains("invalid JSON"));
        assert!(e("{\"citations\": [], \"confidence\": 1}").contains("`answer`"));
        assert!(e("{\"answer\": \"x\", \"confidence\": 1}").contains("`citations`"));
        assert!(
            e("{\"answer\": \"x\", \"citations\": [3], \"confidence\": 1}").contains("chunk ids")
        );
        assert!(
            e("{\"answer\": \"x\", \"citations\": [], \"confidence\": 1.5}").contains("outside")
        );
        assert!(e("{\"answer\": \"x\", \"citations\": []}").contains("`confidence`"));
    }
}
