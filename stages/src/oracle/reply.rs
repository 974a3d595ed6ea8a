//! What an oracle is asked and what it must answer ([`OracleTask`]): a minijinja
//! prompt template rendered per record ([`crate::prompt`]), and the declared JSON
//! shape (`returns:`) that every reply is parsed and checked against, whatever the
//! backend.
//!
//! Declared types: `string`, `number`, `bool`, `list[string]`, `enum[A,B,...]`,
//! and ranges `int[LO,HI]` (an integer within the bounds, e.g. a 0–10 rubric score)
//! and `number[LO,HI]`. A reply may wrap its JSON in prose or a code fence; the
//! first balanced `{…}` object is taken. Anything else is a [`ParseFailure`]
//! with a reason, which the caller retries and then records.

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::prompt::{first_object, render_template};

/// A field type of the declared reply.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldType {
    /// Any string.
    String,
    /// A JSON number.
    Number,
    /// `true` / `false`.
    Bool,
    /// A list of strings.
    StringList,
    /// One of the listed strings (compared case-insensitively, returned as declared).
    Enum(Vec<String>),
    /// An integer in `[lo, hi]` (`int[0,10]`).
    IntRange(i64, i64),
    /// A number in `[lo, hi]` (`number[0,10]`).
    NumberRange(f64, f64),
}

fn range_bounds(spec: &str, list: &str) -> Result<(f64, f64), String> {
    let parts: Vec<&str> = list.split(',').map(str::trim).collect();
    let nums: Option<Vec<f64>> = parts.iter().map(|p| p.parse::<f64>().ok()).collect();
    match nums.as_deref() {
        Some([lo, hi]) if lo <= hi => Ok((*lo, *hi)),
        _ => Err(format!(
            "`{spec}`: expected two bounds LO ≤ HI, e.g. `int[0,10]`"
        )),
    }
}

impl FieldType {
    /// Parses `string`, `number`, `bool`, `list[string]`, `enum[A,B]`.
    pub fn parse(spec: &str) -> Result<FieldType, String> {
        let s = spec.trim();
        Ok(match s {
            "string" => FieldType::String,
            "number" => FieldType::Number,
            "bool" | "boolean" => FieldType::Bool,
            "list[string]" => FieldType::StringList,
            _ if s.starts_with("int[") || s.starts_with("number[") => {
                let (kind, rest) = s.split_once('[').expect("checked");
                let list = rest
                    .strip_suffix(']')
                    .ok_or_else(|| format!("`{spec}`: expected `{kind}[LO,HI]`"))?;
                let (lo, hi) = range_bounds(spec, list)?;
                if kind == "int" {
                    if lo.fract() != 0.0 || hi.fract() != 0.0 {
                        return Err(format!("`{spec}`: integer bounds expected"));
                    }
                    FieldType::IntRange(lo as i64, hi as i64)
                } else {
                    FieldType::NumberRange(lo, hi)
                }
            }
            _ => match s.strip_prefix("enum[").and_then(|r| r.strip_suffix(']')) {
                Some(list) => {
                    let items: Vec<String> = list.split(',').map(|i| i.trim().to_string()).filter(|i| !i.is_empty()).collect();
                    if items.is_empty() {
                        return Err(format!("`{spec}`: an enum needs at least one value"));
                    }
                    FieldType::Enum(items)
                }
                None => return Err(format!("unknown type `{spec}`; expected string, number, bool, list[string] or enum[A,B,...]")),
            },
        })
    }
}

/// Why a reply was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ParseFailure(pub String);

/// A prompt template plus the reply shape.
#[derive(Debug, Clone)]
pub struct OracleTask {
    template: String,
    /// sha256 of the template text (part of oracle stage fingerprints).
    pub template_digest: String,
    /// Declared fields, all required.
    pub returns: BTreeMap<String, FieldType>,
}

impl OracleTask {
    /// A task from template text and `field → type` declarations.
    pub fn new(template: &str, returns: &BTreeMap<String, String>) -> Result<OracleTask, String> {
        let mut env = minijinja::Environment::new();
        env.add_template("prompt", template)
            .map_err(|e| format!("the prompt template does not parse: {e}"))?;
        let mut fields = BTreeMap::new();
        for (k, v) in returns {
            fields.insert(
                k.clone(),
                FieldType::parse(v).map_err(|e| format!("returns.{k}: {e}"))?,
            );
        }
        if fields.is_empty() {
            return Err("`returns` must declare at least one field".into());
        }
        Ok(OracleTask {
            template: template.to_string(),
            template_digest: format!("{:x}", Sha256::digest(template.as_bytes())),
            returns: fields,
        })
    }

    /// Renders the prompt for one record (its fields are the template's variables).
    pub fn render(&self, record: &Value) -> Result<String, String> {
        render_template(&self.template, record)
    }

    /// The reply as a JSON schema (every declared field required), for constrained
    /// decoding and `response_format: json_schema`.
    pub fn json_schema(&self) -> Value {
        let props: serde_json::Map<String, Value> = self
            .returns
            .iter()
            .map(|(name, ty)| {
                let s = match ty {
                    FieldType::String => serde_json::json!({"type": "string"}),
                    FieldType::Number => serde_json::json!({"type": "number"}),
                    FieldType::Bool => serde_json::json!({"type": "boolean"}),
                    FieldType::StringList => {
                        serde_json::json!({"type": "array", "items": {"type": "string"}})
                    }
                    FieldType::Enum(values) => serde_json::json!({"enum": values}),
                    FieldType::IntRange(lo, hi) => {
                        serde_json::json!({"type": "integer", "minimum": lo, "maximum": hi})
                    }
                    // Constrained decoding bounds integers only; the range is checked on parse.
                    FieldType::NumberRange(..) => serde_json::json!({"type": "number"}),
                };
                (name.clone(), s)
            })
            .collect();
        let required: Vec<&String> = self.returns.keys().collect();
        serde_json::json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
    }

    /// Extracts and checks the reply's JSON object; returns only the declared fields.
    pub fn parse(&self, reply: &str) -> Result<Value, ParseFailure> {
        let obj = first_object(reply)
            .ok_or_else(|| ParseFailure("no JSON object in the reply".into()))?;
        let v: Value =
            serde_json::from_str(obj).map_err(|e| ParseFailure(format!("invalid JSON: {e}")))?;
        let mut out = serde_json::Map::new();
        for (name, ty) in &self.returns {
            let f = v
                .get(name)
                .ok_or_else(|| ParseFailure(format!("missing `{name}`")))?;
            let ok = match ty {
                FieldType::String => f.as_str().map(|s| Value::String(s.to_string())),
                FieldType::Number => f.as_f64().map(Value::from),
                FieldType::Bool => f.as_bool().map(Value::Bool),
                FieldType::StringList => f
                    .as_array()
                    .filter(|a| a.iter().all(Value::is_string))
                    .map(|a| Value::Array(a.clone())),
                FieldType::Enum(opts) => f
                    .as_str()
                    .and_then(|s| opts.iter().find(|o| o.eq_ignore_ascii_case(s.trim())))
                    .map(|o| Value::String(o.clone())),
                FieldType::IntRange(lo, hi) => f
                    .as_f64()
                    .filter(|x| x.fract() == 0.0 && *x >= *lo as f64 && *x <= *hi as f64)
                    .map(|x| Value::from(x as i64)),
                FieldType::NumberRange(lo, hi) => {
                    f.as_f64().filter(|x| x >= lo && x <= hi).map(Value::from)
                }
            };
            let value = ok.ok_or_else(|| {
                ParseFailure(format!("`{name}` is not a valid {}: {f}", describe(ty)))
            })?;
            out.insert(name.clone(), value);
        }
        Ok(Value::Object(out))
    }
}

fn describe(t: &FieldType) -> String {
    match t {
        FieldType::String => "string".into(),
        FieldType::Number => "number".into(),
        FieldType::Bool => "bool".into(),
        FieldType::StringList => "list of strings".into(),
        FieldType::Enum(o) => format!("one of {}", o.join(", ")),
        FieldType::IntRange(lo, hi) => format!("integer from {lo} to {hi}"),
        FieldType::NumberRange(lo, hi) => format!("number from {lo} to {hi}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task() -> OracleTask {
        let returns = BTreeMap::from([
            ("answer".to_string(), "string".to_string()),
            ("citations".to_string(), "list[string]".to_string()),
            (
                "verdict".to_string(),
                "enum[SUPPORTS, REFUTES, NOT ENOUGH INFO]".to_string(),
            ),
            ("confidence".to_string(), "number".to_string()),
        ]);
        OracleTask::new(
            "Q: {{ question }}\n{% for c in evidence %}[{{ c.id }}] {{ c.text }}\n{% endfor %}",
            &returns,
        )
        .unwrap()
    }

    #[test]
    fn renders_records_and_rejects_missing_variables() {
        let t = task();
        let r = json!({"question": "Which river?", "evidence": [{"id": "w1", "text": "The Vistula {flows}."}]});
        assert_eq!(
            t.render(&r).unwrap(),
            "Q: Which river?\n[w1] The Vistula {flows}.\n"
        );
        assert!(t
            .render(&json!({"evidence": []}))
            .unwrap_err()
            .contains("undefined"));
        assert_eq!(t.template_digest.len(), 64);
    }

    #[test]
    fn parses_wrapped_json_and_checks_types() {
        let t = task();
        let reply = "Sure! ```json\n{\"answer\": \"Vistula {river}\", \"citations\": [\"w1\"], \"verdict\": \"supports\", \"confidence\": 0.9, \"extra\": 1}\n``` done {";
        let v = t.parse(reply).unwrap();
        assert_eq!(
            v,
            json!({"answer": "Vistula {river}", "citations": ["w1"], "verdict": "SUPPORTS", "confidence": 0.9})
        );
        let bad = |s: &str| t.parse(s).unwrap_err().0;
        assert_eq!(bad("no json here"), "no JSON object in the reply");
        assert!(bad("{\"answer\": \"x\"").contains("no JSON object"));
        assert_eq!(
            bad("{\"answer\": \"x\", \"citations\": [], \"confidence\": 1}"),
            "missing `verdict`"
        );
        assert!(bad(
            "{\"answer\": \"x\", \"citations\": [1], \"verdict\": \"REFUTES\", \"confidence\": 1}"
        )
        .contains("list of strings"));
        assert!(bad(
            "{\"answer\": \"x\", \"citations\": [], \"verdict\": \"MAYBE\", \"confidence\": 1}"
        )
        .contains("one of SUPPORTS"));
        assert!(bad("{'answer': 1}").contains("invalid JSON"));
    }

    #[test]
    fn ranges_are_checked_per_field_and_bound_the_schema() {
        let returns = BTreeMap::from([
            ("agency".to_string(), "int[0,10]".to_string()),
            ("share".to_string(), "number[0, 1]".to_string()),
        ]);
        let t = OracleTask::new("x", &returns).unwrap();
        assert_eq!(
            t.parse(r#"{"agency": 10, "share": 0.5}"#).unwrap(),
            json!({"agency": 10, "share": 0.5})
        );
        let bad = |s: &str| t.parse(s).unwrap_err().0;
        assert!(bad(r#"{"agency": 11, "share": 0.5}"#)
            .contains("`agency` is not a valid integer from 0 to 10"));
        assert!(bad(r#"{"agency": 2.5, "share": 0.5}"#).contains("integer from 0 to 10"));
        assert!(bad(r#"{"agency": 1, "share": 1.5}"#).contains("number from 0 to 1"));
        assert_eq!(bad(r#"{"share": 0.5}"#), "missing `agency`");
        let schema = t.json_schema();
        assert_eq!(
            schema["properties"]["agency"],
            json!({"type": "integer", "minimum": 0, "maximum": 10})
        );
        assert!(FieldType::parse("int[5,1]").is_err());
        assert!(FieldType::parse("int[0.5,1]").is_err());
    }

    #[test]
    fn declarations_are_checked() {
        assert!(FieldType::parse("int")
            .unwrap_err()
            .contains("unknown type `int`"));
        assert!(FieldType::parse("enum[]")
            .unwrap_err()
            .contains("at least one"));
        assert!(
            OracleTask::new("{% if %}", &BTreeMap::from([("a".into(), "string".into())]))
                .unwrap_err()
                .contains("does not parse")
        );
        assert!(OracleTask::new("x", &BTreeMap::new())
            .unwrap_err()
            .contains("at least one field"));
    }
}
