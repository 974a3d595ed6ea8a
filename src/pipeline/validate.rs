//! Validation of one resolved stage ([`Resolver::build`]: `uses:` or `run:`, the kind's
//! typed params through its `declare`, `inputs`, `needs`, `resources`, `env`) and of the
//! references between stages ([`Resolver::link`]: every input names an existing output,
//! every required input is bound, workspace outputs are not written twice).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use pipe_stages::{suggest, OutputLocation};
use serde_json::{Map, Value};

use super::interpolate;
use super::resolve::split_stage_ref;
use super::resolver::Resolver;
use super::yaml::{kind_of, list};
use super::{OutputRef, SpecError, StageSpec};

impl Resolver<'_> {
    /// Kind, params and declaration of one resolved stage.
    pub(super) fn build(
        &mut self,
        name: &str,
        base: &str,
        fields: Map<String, Value>,
    ) -> Option<StageSpec> {
        let span = self.map.key(&["stages", base]);
        let (kind, params, command) = match (fields.get("uses"), fields.get("run")) {
            (Some(_), Some(_)) => {
                let p = self.spath(base, &["run"]);
                self.error(
                    p,
                    format!(
                        "stage `{base}` has both `uses:` and `run:`; a stage is one or the other"
                    ),
                    None,
                );
                return None;
            }
            (None, None) => {
                self.diag.push(SpecError {
                    span: span.clone(),
                    message: format!("stage `{base}` needs `uses: <kind>` or `run: <command>`"),
                    help: Some(format!("built-in kinds: {}", list(self.registry.kinds()))),
                });
                return None;
            }
            (Some(uses), None) => {
                for k in ["deps", "outs", "env"] {
                    if fields.contains_key(k) {
                        let p = self.spath(base, &[k]);
                        self.error(p, format!("`{k}` belongs to `run:` stages; `uses:` stages take `inputs` and `with`"), None);
                    }
                }
                let Some(kind) = uses.as_str() else {
                    let p = self.spath(base, &["uses"]);
                    self.error(
                        p,
                        format!("`uses` must name a stage kind, found {}", kind_of(uses)),
                        None,
                    );
                    return None;
                };
                (
                    kind.to_owned(),
                    fields
                        .get("with")
                        .cloned()
                        .unwrap_or(Value::Object(Map::new())),
                    false,
                )
            }
            (None, Some(_)) => {
                if fields.contains_key("with") {
                    let p = self.spath(base, &["with"]);
                    self.error(p, "`with` belongs to `uses:` stages; a `run:` stage takes `deps`, `outs` and `env`".into(), None);
                }
                let mut params = Map::new();
                for k in ["run", "deps", "outs", "env"] {
                    if let Some(v) = fields.get(k) {
                        params.insert(k.to_owned(), v.clone());
                    }
                }
                (
                    pipe_stages::command::KIND.to_owned(),
                    Value::Object(params),
                    true,
                )
            }
        };
        let Some(stage) = self.registry.get(&kind) else {
            let p = self.spath(base, &["uses"]);
            let kinds: Vec<&str> = self
                .registry
                .kinds()
                .filter(|k| *k != pipe_stages::command::KIND)
                .collect();
            self.error(
                p,
                format!(
                    "unknown stage kind `{kind}`; built-in kinds are {}",
                    list(kinds.iter().copied())
                ),
                suggest(&kind, kinds.iter().copied()).map(|s| format!("did you mean `{s}`?")),
            );
            return None;
        };
        if !params.is_object() {
            let p = self.spath(base, &["with"]);
            self.error(
                p,
                format!("`with` must be a mapping, found {}", kind_of(&params)),
                None,
            );
            return None;
        }
        let signature = match stage.declare(&params) {
            Ok(sig) => sig,
            Err(e) => {
                let mut p = if command {
                    self.spath(base, &[])
                } else {
                    self.spath(base, &["with"])
                };
                p.extend(e.path.iter().cloned());
                let field = e.path.join(".");
                let message = if field.is_empty()
                    || e.message
                        .contains(&format!("`{}`", e.path.last().cloned().unwrap_or_default()))
                {
                    format!("stage `{name}` ({kind}): {}", e.message)
                } else {
                    format!("stage `{name}` ({kind}), field `{field}`: {}", e.message)
                };
                // Unknown keys point at the key itself.
                let span = if e.message.starts_with("unknown field") {
                    self.map.key(&p)
                } else {
                    self.map.value(&p)
                };
                self.diag.push(SpecError {
                    span,
                    message,
                    help: e.help,
                });
                return None;
            }
        };
        let needs = match fields.get("needs") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(other) => {
                let p = self.spath(base, &["needs"]);
                self.error(
                    p,
                    format!(
                        "`needs` must be a list of stage names, found {}",
                        kind_of(other)
                    ),
                    None,
                );
                return None;
            }
        };
        let mut resources = BTreeMap::new();
        if let Some(r) = fields.get("resources") {
            match r.as_object() {
                Some(obj) => {
                    for (k, v) in obj {
                        match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                            Some(n) => {
                                resources.insert(k.clone(), n);
                            }
                            None => {
                                let p = self.spath(base, &["resources", k]);
                                self.error(
                                    p,
                                    format!("resource `{k}` must be a whole number ≥ 0, found {v}"),
                                    None,
                                );
                            }
                        }
                    }
                }
                None => {
                    let p = self.spath(base, &["resources"]);
                    self.error(
                        p,
                        "`resources` must map resource names to counts, e.g. `{gpu: 1}`".into(),
                        None,
                    );
                }
            }
        }
        let desc = fields
            .get("desc")
            .and_then(Value::as_str)
            .map(str::to_owned);
        // Raw input references; checked against the other stages in `link`.
        let mut inputs = BTreeMap::new();
        match fields.get("inputs") {
            None => {}
            Some(Value::Object(obj)) => {
                for (input, reference) in obj {
                    let Some(text) = reference.as_str() else {
                        let p = self.spath(base, &["inputs", input]);
                        self.error(
                            p,
                            format!(
                                "input `{input}` must be `STAGE.OUTPUT`, found {}",
                                kind_of(reference)
                            ),
                            None,
                        );
                        continue;
                    };
                    let parsed = text
                        .rsplit_once('.')
                        .filter(|(s, o)| !s.is_empty() && !o.is_empty());
                    match parsed {
                        Some((s, o)) => {
                            inputs.insert(
                                input.clone(),
                                OutputRef {
                                    stage: s.to_owned(),
                                    output: o.to_owned(),
                                },
                            );
                        }
                        None => {
                            let p = self.spath(base, &["inputs", input]);
                            self.error(
                                p,
                                format!("input `{input}` must be `STAGE.OUTPUT`, found `{text}`"),
                                None,
                            );
                        }
                    }
                }
            }
            Some(other) => {
                let p = self.spath(base, &["inputs"]);
                self.error(
                    p,
                    format!(
                        "`inputs` must map input names to `STAGE.OUTPUT`, found {}",
                        kind_of(other)
                    ),
                    None,
                );
            }
        }
        for (_, expr) in interpolate::expressions(&params) {
            if let Some(rest) = expr.strip_prefix("stages.") {
                if let Some((stage, "outputs", Some(output))) = split_stage_ref(rest) {
                    inputs.insert(
                        expr.clone(),
                        OutputRef {
                            stage: stage.to_owned(),
                            output: output.to_owned(),
                        },
                    );
                }
            }
        }
        Some(StageSpec {
            name: name.to_owned(),
            base: base.to_owned(),
            kind,
            params,
            inputs,
            needs,
            resources,
            signature,
            desc,
            span,
        })
    }

    /// Checks every reference between stages and the inputs each kind requires.
    pub(super) fn link(&mut self, specs: &mut [StageSpec]) {
        let outputs: HashMap<String, Vec<String>> = specs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.signature.outputs.iter().map(|o| o.name.clone()).collect(),
                )
            })
            .collect();
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let bases: BTreeSet<String> = specs.iter().map(|s| s.base.clone()).collect();
        // A dep inside (or containing) another stage's workspace out orders after that
        // stage, as in DVC.
        let outs: Vec<(String, String)> = specs
            .iter()
            .flat_map(|s| {
                s.signature
                    .outputs
                    .iter()
                    .filter_map(move |o| match &o.location {
                        OutputLocation::Workspace(p) => {
                            Some((s.name.clone(), p.trim_end_matches('/').to_owned()))
                        }
                        OutputLocation::Staged(_) => None,
                    })
            })
            .collect();
        let overlaps = |a: &str, b: &str| {
            a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
        };
        for spec in specs.iter_mut() {
            for dep in &spec.signature.deps {
                let dep = dep.trim_end_matches('/');
                for (producer, out) in &outs {
                    if producer != &spec.name
                        && overlaps(dep, out)
                        && !spec.needs.contains(producer)
                    {
                        spec.needs.push(producer.clone());
                    }
                }
            }
        }
        for spec in specs.iter_mut() {
            let base = spec.base.clone();
            for (input, r) in &spec.inputs {
                let implicit = input.starts_with("stages.");
                let path = if implicit {
                    self.spath(&base, &[])
                } else {
                    self.spath(&base, &["inputs", input])
                };
                let Some(outs) = outputs.get(&r.stage) else {
                    let help = if bases.contains(&r.stage) && !names.contains(&r.stage) {
                        Some(format!("`{}` is expanded by foreach/matrix; name one expansion such as `{}@...`", r.stage, r.stage))
                    } else {
                        suggest(&r.stage, names.iter().map(String::as_str))
                            .map(|s| format!("did you mean `{s}`?"))
                    };
                    self.error(
                        path,
                        format!(
                            "stage `{}` refers to `{r}`, but there is no stage `{}`",
                            spec.name, r.stage
                        ),
                        help,
                    );
                    continue;
                };
                if !outs.contains(&r.output) {
                    self.error(
                        path.clone(),
                        format!(
                            "stage `{}` refers to `{r}`, but `{}` has outputs {}",
                            spec.name,
                            r.stage,
                            list(outs.iter().map(String::as_str))
                        ),
                        suggest(&r.output, outs.iter().map(String::as_str))
                            .map(|s| format!("did you mean `{}.{s}`?", r.stage)),
                    );
                }
                if !implicit
                    && !spec.signature.any_inputs
                    && !spec.signature.inputs.iter().any(|d| &d.name == input)
                {
                    let declared: Vec<&str> = spec
                        .signature
                        .inputs
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect();
                    self.diag.push(SpecError {
                        span: self.map.key(&path),
                        message: format!(
                            "unknown input `{input}` for stage `{}` ({}); it takes {}",
                            spec.name,
                            spec.kind,
                            list(declared.iter().copied())
                        ),
                        help: suggest(input, declared.iter().copied())
                            .map(|s| format!("did you mean `{s}`?")),
                    });
                }
            }
            for decl in &spec.signature.inputs {
                if decl.required && !spec.inputs.contains_key(&decl.name) {
                    let p = self.spath(&base, &["inputs"]);
                    let span = if spec.inputs.is_empty() {
                        self.map.key(&p[..2])
                    } else {
                        self.map.value(&p)
                    };
                    self.diag.push(SpecError {
                        span,
                        help: None,
                        message: format!(
                            "stage `{}` ({}) needs input `{}`; add `inputs: {{{}: STAGE.OUTPUT}}`",
                            spec.name, spec.kind, decl.name, decl.name
                        ),
                    });
                }
            }
            let mut needs = Vec::new();
            for (i, need) in spec.needs.iter().enumerate() {
                let matched: Vec<&String> = specs_names_matching(&names, &bases, need);
                if matched.is_empty() {
                    let p = self.spath(&base, &["needs", &i.to_string()]);
                    self.error(
                        p,
                        format!(
                            "stage `{}` needs `{need}`, but there is no such stage",
                            spec.name
                        ),
                        suggest(need, names.iter().map(String::as_str))
                            .map(|s| format!("did you mean `{s}`?")),
                    );
                }
                needs.extend(matched.into_iter().cloned());
            }
            spec.needs = needs;
            for out in &spec.signature.outputs {
                if let OutputLocation::Workspace(p) = &out.location {
                    if interpolate::expressions(&Value::String(p.clone()))
                        .iter()
                        .any(|_| true)
                    {
                        let path = self.spath(&base, &["outs"]);
                        self.error(
                            path,
                            format!("out `{p}` must be a plain path, not a reference"),
                            None,
                        );
                    }
                }
            }
        }
    }
}

fn specs_names_matching<'n>(
    names: &'n [String],
    bases: &BTreeSet<String>,
    pattern: &str,
) -> Vec<&'n String> {
    let exact: Vec<&String> = names.iter().filter(|n| *n == pattern).collect();
    if !exact.is_empty() || !bases.contains(pattern) {
        return exact;
    }
    names
        .iter()
        .filter(|n| {
            n.split_once('@')
                .map(|(b, _)| b == pattern)
                .unwrap_or(false)
        })
        .collect()
}
