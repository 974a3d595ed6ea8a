//! Stage fingerprints: the sha256 of a canonical JSON document holding the stage's kind,
//! the kind's version, its resolved params and the digests of its inputs and workspace
//! deps. The document is kept in the stage record, so a cache miss can always be explained
//! by diffing two documents ([`explain`]).

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use crate::pipeline::hex;

/// Bumped when the engine changes what a fingerprint covers.
pub const ENGINE_VERSION: u32 = 1;

/// A fingerprint document and its key.
#[derive(Debug, Clone)]
pub struct Fingerprint {
    /// The canonical document.
    pub doc: Value,
    /// sha256 (hex) of the document's canonical JSON.
    pub key: String,
}

impl Fingerprint {
    /// Builds the document for one stage.
    pub fn new(
        kind: &str,
        version: u32,
        params: &Value,
        inputs: &BTreeMap<String, String>,
        deps: &BTreeMap<String, String>,
    ) -> Self {
        let doc = json!({
            "pipe": ENGINE_VERSION,
            "kind": kind,
            "version": version,
            "params": params,
            "inputs": inputs,
            "deps": deps,
        });
        Self::from_doc(doc)
    }

    /// The key of an existing document.
    pub fn from_doc(doc: Value) -> Self {
        let key = hex(&Sha256::digest(canonical_json(&doc).as_bytes()));
        Fingerprint { doc, key }
    }
}

/// JSON with object keys sorted and no whitespace, independent of how the value was built
/// (and of serde_json's `preserve_order` feature, should a dependency turn it on).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// One difference between two fingerprint documents.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Dotted path (`params.lr`, `inputs.train`, `deps.data/raw.jsonl`).
    pub path: String,
    /// The old value, absent when added.
    pub old: Option<Value>,
    /// The new value, absent when removed.
    pub new: Option<Value>,
}

impl Change {
    /// The top-level component: `params`, `inputs`, `deps`, `kind`, `version` or `pipe`.
    pub fn component(&self) -> &str {
        self.path.split('.').next().unwrap_or("")
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Value| -> String {
            let s = match v {
                Value::String(s) if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) => {
                    s[..12].to_owned()
                }
                other => other.to_string(),
            };
            if s.chars().count() > 80 {
                format!("{}…", s.chars().take(77).collect::<String>())
            } else {
                s
            }
        };
        match (&self.old, &self.new) {
            (Some(o), Some(n)) => write!(f, "{}: {} → {}", self.path, show(o), show(n)),
            (None, Some(n)) => write!(f, "{}: added ({})", self.path, show(n)),
            (Some(o), None) => write!(f, "{}: removed (was {})", self.path, show(o)),
            (None, None) => write!(f, "{}", self.path),
        }
    }
}

/// Every leaf that differs between two documents, in sorted path order.
pub fn explain(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    diff(old, new, &mut String::new(), &mut out);
    out
}

fn diff(old: &Value, new: &Value, path: &mut String, out: &mut Vec<Change>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(x, y, path, out),
                    (x, y) => out.push(Change {
                        path: path.clone(),
                        old: x.cloned(),
                        new: y.cloned(),
                    }),
                }
                path.truncate(len);
            }
        }
        (a, b) if a != b => out.push(Change {
            path: path.clone(),
            old: Some(a.clone()),
            new: Some(b.clone()),
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ignores_construction_order() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": 2, "x": [1, 2]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a": {"x": [1, 2], "y": 2}, "b": 1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":[1,2],"y":2},"b":1}"#);
    }

    #[test]
    fn explain_names_changed_leaves() {
        let e = BTreeMap::new();
        let a = Fingerprint::new("k", 1, &json!({"lr": 1e-5, "x": {"y": 1}}), &e, &e);
        let b = Fingerprint::new(
            "k",
            1,
            &json!({"lr": 2e-5, "x": {"y": 1}, "z": true}),
            &e,
            &e,
        );
        assert_ne!(a.key, b.key);
        let changes: Vec<String> = explain(&a.doc, &b.doc)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            changes,
            ["params.lr: 0.00001 → 0.00002", "params.z: added (true)"]
        );
    }
}
