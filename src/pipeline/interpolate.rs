//! `${...}` interpolation inside pipeline values.
//!
//! A string that is exactly one `${expr}` takes the referenced value with its type (a
//! number stays a number, a mapping stays a mapping); an expression inside longer text is
//! formatted into it and must be a scalar. `$${` writes a literal `${`. References that
//! can only be known at run time (`${stages.X.outputs.Y}`, a path in the store) are kept
//! verbatim and replaced by the executor.

use serde_json::Value;

/// What an expression resolves to.
pub enum Resolved {
    /// A value known now.
    Value(Value),
    /// Known only when the stage runs: keep `${expr}` as written.
    Deferred,
}

/// A failed interpolation, located by the path inside the interpolated value.
#[derive(Debug)]
pub struct InterpError {
    /// Keys and indices from the interpolated root down to the failing string.
    pub path: Vec<String>,
    /// What went wrong.
    pub message: String,
    /// A suggestion.
    pub help: Option<String>,
}

/// A lookup failure: message and an optional suggestion.
pub type LookupError = (String, Option<String>);

/// Replaces every `${expr}` in the strings of `value`.
pub fn interpolate(
    value: &Value,
    lookup: &mut dyn FnMut(&str) -> Result<Resolved, LookupError>,
) -> Result<Value, InterpError> {
    let mut path = Vec::new();
    walk(value, &mut path, lookup)
}

fn walk(
    value: &Value,
    path: &mut Vec<String>,
    lookup: &mut dyn FnMut(&str) -> Result<Resolved, LookupError>,
) -> Result<Value, InterpError> {
    Ok(match value {
        Value::String(s) => render(s, lookup).map_err(|(message, help)| InterpError {
            path: path.clone(),
            message,
            help,
        })?,
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                path.push(i.to_string());
                out.push(walk(item, path, lookup)?);
                path.pop();
            }
            Value::Array(out)
        }
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                path.push(k.clone());
                out.insert(k.clone(), walk(v, path, lookup)?);
                path.pop();
            }
            Value::Object(out)
        }
        other => other.clone(),
    })
}

enum Piece<'a> {
    Text(String),
    Expr(&'a str),
}

fn pieces(s: &str) -> Result<Vec<Piece<'_>>, LookupError> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find("${") {
        if pos > 0 && rest.as_bytes()[pos - 1] == b'$' {
            text.push_str(&rest[..pos - 1]);
            text.push_str("${");
            rest = &rest[pos + 2..];
            continue;
        }
        text.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let end = after.find('}').ok_or_else(|| {
            (
                format!("unclosed `${{` in `{s}`"),
                Some("write `${name}`, or `$${` for a literal `${`".to_owned()),
            )
        })?;
        if !text.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut text)));
        }
        out.push(Piece::Expr(after[..end].trim()));
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

/// Interpolates one string.
pub fn render(
    s: &str,
    lookup: &mut dyn FnMut(&str) -> Result<Resolved, LookupError>,
) -> Result<Value, LookupError> {
    if !s.contains("${") {
        return Ok(Value::String(s.to_owned()));
    }
    let pieces = pieces(s)?;
    if let [Piece::Expr(expr)] = pieces.as_slice() {
        return Ok(match lookup(expr)? {
            Resolved::Value(v) => v,
            Resolved::Deferred => Value::String(format!("${{{expr}}}")),
        });
    }
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(&t),
            Piece::Expr(expr) => match lookup(expr)? {
                Resolved::Deferred => out.push_str(&format!("${{{expr}}}")),
                Resolved::Value(Value::String(v)) => out.push_str(&v),
                Resolved::Value(v @ (Value::Number(_) | Value::Bool(_))) => {
                    out.push_str(&v.to_string())
                }
                Resolved::Value(Value::Null) => {
                    return Err((
                        format!("`${{{expr}}}` is null and cannot be part of a string"),
                        None,
                    ))
                }
                Resolved::Value(_) => {
                    return Err((
                        format!(
                            "`${{{expr}}}` is a list or mapping and cannot be part of a string"
                        ),
                        Some(format!(
                            "use `${{{expr}}}` as the whole value to insert it as is"
                        )),
                    ))
                }
            },
        }
    }
    Ok(Value::String(out))
}

/// Every `${expr}` written in the strings of `value`, with the path of its string.
pub fn expressions(value: &Value) -> Vec<(Vec<String>, String)> {
    fn go(v: &Value, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, String)>) {
        match v {
            Value::String(s) if s.contains("${") => {
                if let Ok(ps) = pieces(s) {
                    for p in ps {
                        if let Piece::Expr(e) = p {
                            out.push((path.clone(), e.to_owned()));
                        }
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(i.to_string());
                    go(item, path, out);
                    path.pop();
                }
            }
            Value::Object(map) => {
                for (k, item) in map {
                    path.push(k.clone());
                    go(item, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    go(value, &mut Vec::new(), &mut out);
    out
}

/// Replaces `${expr}` by `replacement(expr)` where it returns `Some`, in every string.
pub fn substitute(value: &Value, replacement: &dyn Fn(&str) -> Option<String>) -> Value {
    match value {
        Value::String(s) if s.contains("${") => {
            let Ok(ps) = pieces(s) else {
                return value.clone();
            };
            let mut out = String::new();
            for p in ps {
                match p {
                    Piece::Text(t) => out.push_str(&t.replace("${", "$${")),
                    Piece::Expr(e) => match replacement(e) {
                        Some(r) => out.push_str(&r),
                        None => out.push_str(&format!("${{{e}}}")),
                    },
                }
            }
            Value::String(out)
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| substitute(v, replacement)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), substitute(v, replacement)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lookup(expr: &str) -> Result<Resolved, LookupError> {
        match expr {
            "params.n" => Ok(Resolved::Value(json!(3))),
            "params.m" => Ok(Resolved::Value(json!({"a": 1}))),
            "params.s" => Ok(Resolved::Value(json!("x"))),
            e if e.starts_with("stages.") => Ok(Resolved::Deferred),
            e => Err((format!("undefined `{e}`"), None)),
        }
    }

    #[test]
    fn whole_string_keeps_type() {
        let v = interpolate(
            &json!({"a": "${params.n}", "b": "${params.m}"}),
            &mut lookup,
        )
        .unwrap();
        assert_eq!(v, json!({"a": 3, "b": {"a": 1}}));
    }

    #[test]
    fn embedded_and_escaped() {
        let v = interpolate(
            &json!("n=${params.n}-${params.s} $${params.n}"),
            &mut lookup,
        )
        .unwrap();
        assert_eq!(v, json!("n=3-x ${params.n}"));
    }

    #[test]
    fn deferred_kept_verbatim() {
        let v = interpolate(&json!("cat ${stages.a.outputs.b} > x"), &mut lookup).unwrap();
        assert_eq!(v, json!("cat ${stages.a.outputs.b} > x"));
    }

    #[test]
    fn errors_carry_path() {
        let err = interpolate(&json!({"x": [1, "${params.q}"]}), &mut lookup).unwrap_err();
        assert_eq!(err.path, ["x", "1"]);
        let err = interpolate(&json!("a ${params.m}"), &mut lookup).unwrap_err();
        assert!(err.message.contains("list or mapping"));
        let err = interpolate(&json!("a ${params.n"), &mut lookup).unwrap_err();
        assert!(err.message.contains("unclosed"));
    }
}
