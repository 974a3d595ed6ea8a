//! Loading a pipeline file: YAML text → JSON values (string keys, finite numbers, no
//! tags, `<<` merges applied), with places taken from [`super::source_map`] so that every
//! later error still names `file:line:col`; and the shape checks shared by the other
//! steps (a mapping where one is expected, unknown keys with a "did you mean").

use pipe_stages::suggest;
use serde_json::{Map, Value};

use super::source_map::{SourceMap, Span};
use super::{err, SpecError};

/// Parses YAML into JSON values (keys must be strings), with serde_yaml's own location on
/// syntax errors.
pub fn parse_yaml(file: &str, text: &str) -> Result<Value, SpecError> {
    let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        let span = match e.location() {
            Some(l) => Span {
                file: file.into(),
                line: l.line(),
                col: l.column(),
            },
            None => Span {
                file: file.into(),
                line: 1,
                col: 1,
            },
        };
        let message = e.to_string();
        let message = match message.find(" at line ") {
            Some(i) => message[..i].to_owned(),
            None => message,
        };
        SpecError {
            span,
            message: format!("invalid YAML: {message}"),
            help: None,
        }
    })?;
    value.apply_merge().map_err(|e| SpecError {
        span: Span::arg(file),
        message: format!("invalid YAML merge: {e}"),
        help: None,
    })?;
    let map = SourceMap::parse(file, text);
    to_json(value, &map, &mut Vec::new())
}

pub(super) fn to_json(
    value: serde_yaml::Value,
    map: &SourceMap,
    path: &mut Vec<String>,
) -> Result<Value, SpecError> {
    use serde_yaml::Value as Y;
    Ok(match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| {
                    err(map, path, format!("`{f}` is not a finite number; pipelines accept finite numbers only"))
                })?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                path.push(i.to_string());
                out.push(to_json(item, map, path)?);
                path.pop();
            }
            Value::Array(out)
        }
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => {
                        return Err(err(
                            map,
                            path,
                            format!("mapping keys must be strings, found {other:?}"),
                        ));
                    }
                };
                path.push(key.clone());
                let v = to_json(v, map, path)?;
                path.pop();
                out.insert(key, v);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => {
            return Err(err(
                map,
                path,
                format!("YAML tags such as `{}` are not supported", t.tag),
            ));
        }
    })
}

pub(super) fn as_object<'a>(
    value: &'a Value,
    map: &SourceMap,
    path: &[&str],
    what: &str,
    expected: &str,
) -> Result<&'a Map<String, Value>, SpecError> {
    value.as_object().ok_or_else(|| {
        err(
            map,
            path,
            format!("{what} must be {expected}, found {}", kind_of(value)),
        )
    })
}

pub(super) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

pub(super) fn check_keys<S: AsRef<str>>(
    obj: &Map<String, Value>,
    allowed: &[&str],
    map: &SourceMap,
    path: &[S],
    where_: &str,
    diag: &mut Vec<SpecError>,
) {
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            let mut p: Vec<String> = path.iter().map(|s| s.as_ref().to_owned()).collect();
            p.push(key.clone());
            diag.push(SpecError {
                span: map.key(&p),
                message: format!(
                    "unknown key `{key}` {where_}; expected one of {}",
                    list(allowed.iter().copied())
                ),
                help: suggest(key, allowed.iter().copied()).map(|s| format!("did you mean `{s}`?")),
            });
        }
    }
}

pub(super) fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items
        .into_iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
