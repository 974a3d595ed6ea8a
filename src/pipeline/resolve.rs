//! `${...}` resolution at load time: pipeline params among themselves
//! ([`resolve_params`], in passes so their order does not matter), then each stage
//! instance's fields against `params`, `item`, `key` and other stages' `with:` (resolved
//! on demand, cycles reported). `${stages.X.outputs.Y}` stays deferred until run time;
//! the syntax itself lives in [`super::interpolate`].

use std::collections::{BTreeSet, HashMap};

use pipe_stages::suggest;
use serde_json::{Map, Value};

use super::interpolate::{self, LookupError, Resolved};
use super::resolver::Resolver;
use super::source_map::SourceMap;
use super::yaml::{kind_of, list};
use super::{err, LoadError, SpecError};

/// Resolves `${params.x}` references between params (in passes, so order does not matter).
pub(super) fn resolve_params(mut params: Value, map: &SourceMap) -> Result<Value, LoadError> {
    if !params.is_object() {
        return Err(err(
            map,
            &["params"],
            format!("`params:` must be a mapping, found {}", kind_of(&params)),
        )
        .into());
    }
    for _ in 0..16 {
        if interpolate::expressions(&params).is_empty() {
            return Ok(params);
        }
        let snapshot = params.clone();
        let mut lookup = |expr: &str| -> Result<Resolved, LookupError> {
            match expr.strip_prefix("params.") {
                Some(rest) => {
                    let v = walk_path(&snapshot, rest, "params")?;
                    // Unresolved references inside are resolved in a later pass.
                    Ok(Resolved::Value(v.clone()))
                }
                None => Err((
                    format!("`${{{expr}}}`: params may refer only to other `params.*`"),
                    None,
                )),
            }
        };
        params = interpolate::interpolate(&snapshot, &mut lookup).map_err(|e| {
            let mut p = vec!["params".to_owned()];
            p.extend(e.path);
            SpecError {
                span: map.value(&p),
                message: e.message,
                help: e.help,
            }
        })?;
        if params == snapshot {
            break;
        }
    }
    let left = interpolate::expressions(&params);
    if let Some((path, expr)) = left.first() {
        let mut p = vec!["params".to_owned()];
        p.extend(path.iter().cloned());
        return Err(err(
            map,
            &p,
            format!("`${{{expr}}}` never resolves: params refer to each other in a cycle"),
        )
        .into());
    }
    Ok(params)
}

/// Follows `a.b.0.c` through mappings and lists, naming the first missing step.
pub(super) fn walk_path<'v>(
    root: &'v Value,
    dotted: &str,
    root_name: &str,
) -> Result<&'v Value, LookupError> {
    let mut cur = root;
    let mut seen = root_name.to_owned();
    for seg in dotted.split('.') {
        let next = match cur {
            Value::Object(o) => o.get(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => {
                let keys: Vec<&str> = cur
                    .as_object()
                    .map(|o| o.keys().map(String::as_str).collect())
                    .unwrap_or_default();
                let message = if keys.is_empty() {
                    format!("undefined `{root_name}.{dotted}`: `{seen}` has no `{seg}`")
                } else {
                    format!(
                        "undefined `{root_name}.{dotted}`: `{seen}` has {}",
                        list(keys.iter().copied())
                    )
                };
                return Err((
                    message,
                    suggest(seg, keys).map(|s| format!("did you mean `{s}`?")),
                ));
            }
        }
        seen.push('.');
        seen.push_str(seg);
    }
    Ok(cur)
}

/// Splits `NAME.outputs.OUT` / `NAME.with.A.B` (NAME may contain dots after an `@`).
pub(super) fn split_stage_ref(rest: &str) -> Option<(&str, &str, Option<&str>)> {
    for field in ["outputs", "with"] {
        let marker = format!(".{field}");
        let mut search = 0;
        while let Some(pos) = rest[search..].find(&marker) {
            let at = search + pos;
            let after = &rest[at + marker.len()..];
            if after.is_empty() || after.starts_with('.') {
                let tail = after.strip_prefix('.').filter(|t| !t.is_empty());
                return Some((&rest[..at], field, tail));
            }
            search = at + 1;
        }
    }
    None
}

impl Resolver<'_> {
    /// Interpolates one instance's fields, resolving other stages' `with` on demand.
    pub(super) fn resolve(&mut self, name: &str) -> Option<Map<String, Value>> {
        if let Some(done) = self.resolved.get(name) {
            return Some(done.clone());
        }
        if let Some(pos) = self.resolving.iter().position(|n| n == name) {
            let mut cycle: Vec<String> = self.resolving[pos..].to_vec();
            cycle.push(name.to_owned());
            let base = self
                .instances
                .iter()
                .find(|i| i.name == name)
                .map(|i| i.base.clone())
                .unwrap_or_default();
            let p = self.spath(&base, &[]);
            self.error(
                p,
                format!(
                    "stages refer to each other's `with` in a cycle: {}",
                    cycle.join(" → ")
                ),
                None,
            );
            return None;
        }
        let idx = self.instances.iter().position(|i| i.name == name)?;
        self.resolving.push(name.to_owned());
        let body = Value::Object(self.instances[idx].body.clone());
        let (item, key, base) = (
            self.instances[idx].item.clone(),
            self.instances[idx].key.clone(),
            self.instances[idx].base.clone(),
        );
        let result = {
            let mut pending: Vec<String> = Vec::new();
            let params = self.params;
            let names: Vec<String> = self.instances.iter().map(|i| i.name.clone()).collect();
            let bases: BTreeSet<String> = self.instances.iter().map(|i| i.base.clone()).collect();
            let snapshot: HashMap<String, Map<String, Value>> = self.resolved.clone();
            let mut lookup = |expr: &str| -> Result<Resolved, LookupError> {
                let (root, rest) = match expr.split_once('.') {
                    Some((r, rest)) => (r, Some(rest)),
                    None => (expr, None),
                };
                match root {
                    "params" => match rest {
                        Some(rest) => walk_path(params, rest, "params").map(|v| Resolved::Value(v.clone())),
                        None => Ok(Resolved::Value(params.clone())),
                    },
                    "item" | "key" => {
                        let bound = if root == "item" { &item } else { &key };
                        let Some(v) = bound else {
                            return Err((format!("`${{{expr}}}`: `{root}` is defined only in stages with `foreach` or `matrix`"), None));
                        };
                        match rest {
                            Some(rest) => walk_path(v, rest, root).map(|v| Resolved::Value(v.clone())),
                            None => Ok(Resolved::Value(v.clone())),
                        }
                    }
                    "stages" => {
                        let rest = rest.unwrap_or("");
                        let (stage, field, tail) = split_stage_ref(rest).ok_or_else(|| {
                            (
                                format!("`${{{expr}}}`: expected `stages.NAME.outputs.OUTPUT` or `stages.NAME.with.KEY`"),
                                None,
                            )
                        })?;
                        if !names.iter().any(|n| n == stage) {
                            let help = if bases.contains(stage) {
                                Some(format!("`{stage}` is expanded by foreach/matrix; name one expansion such as `{stage}@...`"))
                            } else {
                                suggest(stage, names.iter().map(String::as_str)).map(|s| format!("did you mean `{s}`?"))
                            };
                            return Err((format!("`${{{expr}}}`: no stage named `{stage}`"), help));
                        }
                        match field {
                            "outputs" => Ok(Resolved::Deferred),
                            _ => match snapshot.get(stage) {
                                Some(fields) => {
                                    let with = fields.get("with").cloned().unwrap_or(Value::Object(Map::new()));
                                    match tail {
                                        Some(t) => walk_path(&with, t, &format!("stages.{stage}.with")).map(|v| Resolved::Value(v.clone())),
                                        None => Ok(Resolved::Value(with)),
                                    }
                                }
                                None => {
                                    pending.push(stage.to_owned());
                                    Ok(Resolved::Value(Value::Null))
                                }
                            },
                        }
                    }
                    other => Err((
                        format!("`${{{expr}}}`: unknown variable `{other}`; expected `params`, `item`, `key` or `stages`"),
                        suggest(other, ["params", "item", "key", "stages"]).map(|s| format!("did you mean `{s}`?")),
                    )),
                }
            };
            let first = interpolate::interpolate(&body, &mut lookup);
            match first {
                Err(e) => Err(e),
                Ok(v) if pending.is_empty() => Ok(v),
                Ok(_) => {
                    // Resolve the stages whose `with` we need, then try again.
                    let ok = pending.iter().all(|p| self.resolve(p).is_some());
                    self.resolving.pop();
                    return if ok { self.resolve(name) } else { None };
                }
            }
        };
        self.resolving.pop();
        match result {
            Ok(Value::Object(fields)) => {
                self.resolved.insert(name.to_owned(), fields.clone());
                Some(fields)
            }
            Ok(_) => None,
            Err(e) => {
                let mut p = self.spath(&base, &[]);
                p.extend(e.path);
                self.error(p, e.message, e.help);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_refs_split_at_field() {
        assert_eq!(
            split_stage_ref("split.outputs.train"),
            Some(("split", "outputs", Some("train")))
        );
        assert_eq!(
            split_stage_ref("t@0.5.with.lr"),
            Some(("t@0.5", "with", Some("lr")))
        );
        assert_eq!(split_stage_ref("a.with"), Some(("a", "with", None)));
        assert_eq!(split_stage_ref("a.b"), None);
    }
}
