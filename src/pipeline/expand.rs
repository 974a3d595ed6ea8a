//! `foreach` and `matrix`: one stage body becomes several instances named
//! `base@suffix`, each carrying its `${item}` / `${key}`. Stage keys are checked here, before
//! anything is interpolated, and the expanded names must be unique.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::interpolate::{self, LookupError, Resolved};
use super::resolve::walk_path;
use super::resolver::{Instance, Resolver};
use super::yaml::{check_keys, kind_of};
use super::{valid_name, SpecError, STAGE_KEYS};

impl Resolver<'_> {
    /// Checks stage keys and expands `foreach` / `matrix`.
    pub(super) fn expand(&mut self) {
        let raw = std::mem::take(&mut self.raw);
        for (base, body) in raw {
            if !valid_name(&base) {
                self.diag.push(SpecError {
                    span: self.map.key(&["stages", &base]),
                    message: format!(
                        "stage name `{base}` may use letters, digits, `_` and `-` only"
                    ),
                    help: None,
                });
                continue;
            }
            let Some(obj) = body.as_object() else {
                let p = self.spath(&base, &[]);
                self.error(
                    p,
                    format!(
                        "stage `{base}` must be a mapping with `uses:` or `run:`, found {}",
                        kind_of(&body)
                    ),
                    None,
                );
                continue;
            };
            let before = self.diag.len();
            check_keys(
                obj,
                STAGE_KEYS,
                self.map,
                &["stages", &base],
                &format!("in stage `{base}`"),
                &mut self.diag,
            );
            if self.diag.len() > before {
                continue;
            }
            let mut body = obj.clone();
            let foreach = body.remove("foreach");
            let matrix = body.remove("matrix");
            match (foreach, matrix) {
                (None, None) => self.instances.push(Instance {
                    name: base.clone(),
                    base,
                    body,
                    item: None,
                    key: None,
                }),
                (Some(_), Some(_)) => {
                    let p = self.spath(&base, &["matrix"]);
                    self.error(
                        p,
                        format!("stage `{base}` has both `foreach` and `matrix`; use one"),
                        None,
                    );
                }
                (Some(list), None) => self.expand_foreach(&base, &body, list),
                (None, Some(m)) => self.expand_matrix(&base, &body, m),
            }
        }
        let mut seen = BTreeSet::new();
        for inst in &self.instances {
            if !seen.insert(inst.name.clone()) {
                let p = vec!["stages".to_owned(), inst.base.clone()];
                self.diag.push(SpecError {
                    span: self.map.key(&p),
                    message: format!("two stages are named `{}` after expansion", inst.name),
                    help: Some("make the foreach values distinct".into()),
                });
            }
        }
    }

    fn params_only(&mut self, base: &str, field: &str, value: Value) -> Option<Value> {
        let params = self.params;
        let mut lookup = |expr: &str| -> Result<Resolved, LookupError> {
            match expr.strip_prefix("params.") {
                Some(rest) => walk_path(params, rest, "params").map(|v| Resolved::Value(v.clone())),
                None => Err((
                    format!("`${{{expr}}}`: `{field}` may refer only to `params.*`"),
                    None,
                )),
            }
        };
        match interpolate::interpolate(&value, &mut lookup) {
            Ok(v) => Some(v),
            Err(e) => {
                let mut p = self.spath(base, &[field]);
                p.extend(e.path);
                self.error(p, e.message, e.help);
                None
            }
        }
    }

    fn expand_foreach(&mut self, base: &str, body: &Map<String, Value>, list: Value) {
        let Some(list) = self.params_only(base, "foreach", list) else {
            return;
        };
        match list {
            Value::Array(items) if !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    let suffix = scalar_text(item).unwrap_or_else(|| i.to_string());
                    self.instances.push(Instance {
                        name: format!("{base}@{}", sanitize(&suffix)),
                        base: base.to_owned(),
                        body: body.clone(),
                        item: Some(item.clone()),
                        key: Some(Value::from(i)),
                    });
                }
            }
            Value::Object(items) if !items.is_empty() => {
                for (k, item) in items {
                    self.instances.push(Instance {
                        name: format!("{base}@{}", sanitize(&k)),
                        base: base.to_owned(),
                        body: body.clone(),
                        item: Some(item),
                        key: Some(Value::String(k)),
                    });
                }
            }
            other => {
                let p = self.spath(base, &["foreach"]);
                self.error(
                    p,
                    format!(
                        "`foreach` must be a non-empty list or mapping, found {}",
                        kind_of(&other)
                    ),
                    None,
                );
            }
        }
    }

    fn expand_matrix(&mut self, base: &str, body: &Map<String, Value>, matrix: Value) {
        let Some(matrix) = self.params_only(base, "matrix", matrix) else {
            return;
        };
        let Some(axes) = matrix.as_object().filter(|m| !m.is_empty()) else {
            let p = self.spath(base, &["matrix"]);
            self.error(
                p,
                "`matrix` must map names to non-empty lists, e.g. `{lr: [1e-5, 2e-5], r: [8, 16]}`"
                    .into(),
                None,
            );
            return;
        };
        let mut combos: Vec<Vec<(String, Value)>> = vec![Vec::new()];
        for (name, values) in axes {
            let Some(values) = values.as_array().filter(|v| !v.is_empty()) else {
                let p = self.spath(base, &["matrix", name]);
                self.error(
                    p,
                    format!("matrix axis `{name}` must be a non-empty list"),
                    None,
                );
                return;
            };
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((name.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        for (i, combo) in combos.into_iter().enumerate() {
            let parts: Option<Vec<String>> = combo.iter().map(|(_, v)| scalar_text(v)).collect();
            let suffix = parts.map(|p| p.join("-")).unwrap_or_else(|| i.to_string());
            let item: Map<String, Value> = combo.into_iter().collect();
            self.instances.push(Instance {
                name: format!("{base}@{}", sanitize(&suffix)),
                base: base.to_owned(),
                body: body.clone(),
                item: Some(Value::Object(item)),
                key: Some(Value::from(i)),
            });
        }
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}
