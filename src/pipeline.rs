//! Pipeline files: parsing, profiles and overrides, `foreach`/`matrix` expansion,
//! interpolation, and validation of every stage against its kind's typed params.
//!
//! The result is a [`Pipeline`]: a flat list of [`StageSpec`]s whose params are resolved
//! JSON, ready for planning and fingerprinting. Every problem found on the way is a
//! [`SpecError`] that names the place (`file:line:col`), what was expected and, where a
//! near miss exists, a "did you mean".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use pipe_stages::{suggest, OutputLocation, Registry, Signature};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use crate::interpolate::{self, LookupError, Resolved};
use crate::source_map::{SourceMap, Span};

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "workdir",
    "params",
    "profiles",
    "stages",
];
const STAGE_KEYS: &[&str] = &[
    "uses",
    "run",
    "with",
    "inputs",
    "deps",
    "outs",
    "env",
    "needs",
    "resources",
    "foreach",
    "matrix",
    "desc",
];
const PROFILE_KEYS: &[&str] = &["params", "stages"];

/// How to load a pipeline: the profile and the overrides given on the command line.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--profile NAME`.
    pub profile: Option<String>,
    /// `-p FILE`, merged into `params` in order.
    pub param_files: Vec<PathBuf>,
    /// `--set path=value`, applied in order after the params files.
    pub sets: Vec<String>,
}

/// One problem in a pipeline, with its place.
#[derive(Debug, Clone)]
pub struct SpecError {
    /// Where it is.
    pub span: Span,
    /// What is wrong and what was expected.
    pub message: String,
    /// A suggestion ("did you mean ...").
    pub help: Option<String>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.span, self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

/// Why a pipeline could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file (or a params file) could not be read.
    #[error("cannot read `{path}`: {source}")]
    Read {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// One or more problems in the pipeline.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Spec(Vec<SpecError>),
}

impl From<SpecError> for LoadError {
    fn from(e: SpecError) -> Self {
        LoadError::Spec(vec![e])
    }
}

/// A reference to one output of one stage: `split.train`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutputRef {
    /// The stage's name.
    pub stage: String,
    /// The output's name.
    pub output: String,
}

impl fmt::Display for OutputRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.stage, self.output)
    }
}

/// A stage after expansion, interpolation and validation.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Name in the pipeline (`train@small` for an expanded stage).
    pub name: String,
    /// The key under `stages:` it came from.
    pub base: String,
    /// The stage kind.
    pub kind: String,
    /// Resolved params (the `with:` block; for `run:` stages `run`, `deps`, `outs`, `env`).
    pub params: Value,
    /// Input name → upstream output. References written as `${stages.X.outputs.Y}` inside
    /// params appear here under the name `stages.X.outputs.Y`.
    pub inputs: BTreeMap<String, OutputRef>,
    /// Stages that must finish first without passing data.
    pub needs: Vec<String>,
    /// Resources the stage holds while running (`gpu: 1`).
    pub resources: BTreeMap<String, u32>,
    /// What the kind declared for these params.
    pub signature: Signature,
    /// A one-line description.
    pub desc: Option<String>,
    /// Where the stage is written.
    pub span: Span,
}

impl StageSpec {
    /// Upstream stages, data and ordering dependencies together, without repeats.
    pub fn upstream(&self) -> BTreeSet<&str> {
        self.inputs
            .values()
            .map(|r| r.stage.as_str())
            .chain(self.needs.iter().map(String::as_str))
            .collect()
    }
}

/// A loaded, validated pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file as given.
    pub file: PathBuf,
    /// `name:` (defaults to the file stem).
    pub name: String,
    /// sha256 of the file's bytes.
    pub digest: String,
    /// Directory that workspace paths are relative to.
    pub workdir: PathBuf,
    /// Resolved pipeline params.
    pub params: Value,
    /// The profile applied, if any.
    pub profile: Option<String>,
    /// Stages in file order (expansions in place of their base).
    pub stages: Vec<StageSpec>,
}

impl Pipeline {
    /// Loads and validates `file`.
    pub fn load(
        file: &Path,
        options: &LoadOptions,
        registry: &Registry,
    ) -> Result<Pipeline, LoadError> {
        let text = std::fs::read_to_string(file).map_err(|source| LoadError::Read {
            path: file.display().to_string(),
            source,
        })?;
        let shown = file.display().to_string();
        let mut doc = parse_yaml(&shown, &text)?;
        let mut map = SourceMap::parse(&shown, &text);
        let mut diag = Vec::new();

        let top = as_object(
            &doc,
            &map,
            &[],
            "the pipeline file",
            "a mapping with `stages:`",
        )?;
        check_keys(
            top,
            TOP_KEYS,
            &map,
            &[] as &[&str],
            "at the top level",
            &mut diag,
        );
        if !top.contains_key("stages") {
            diag.push(SpecError {
                span: map.start(),
                message: "missing `stages:`; a pipeline needs at least one stage".into(),
                help: None,
            });
        }
        finish(&mut diag)?;

        if let Some(profile) = &options.profile {
            apply_profile(&mut doc, &mut map, profile)?;
        }
        for params_file in &options.param_files {
            apply_params_file(&mut doc, &mut map, params_file)?;
        }
        for set in &options.sets {
            apply_set(&mut doc, &mut map, set)?;
        }

        let top = doc.as_object().expect("checked above");
        let name = match top.get("name") {
            None => file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "pipeline".into()),
            Some(Value::String(s)) if valid_name(s) => s.clone(),
            Some(_) => {
                return Err(err(
                    &map,
                    &["name"],
                    "expected `name:` to be a word of letters, digits, `_` or `-`",
                )
                .into())
            }
        };
        let base_dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let workdir = match top.get("workdir") {
            None => base_dir.to_path_buf(),
            Some(Value::String(s)) => base_dir.join(s),
            Some(_) => {
                return Err(err(
                    &map,
                    &["workdir"],
                    "expected `workdir:` to be a path relative to the file",
                )
                .into())
            }
        };
        let params = resolve_params(
            top.get("params")
                .cloned()
                .unwrap_or(Value::Object(Map::new())),
            &map,
        )?;
        let stages_value = top.get("stages").cloned().unwrap_or_default();
        let stages_map = as_object(
            &stages_value,
            &map,
            &["stages"],
            "`stages:`",
            "a mapping of stage name to stage",
        )?;

        let mut resolver = Resolver::new(&map, &params, registry);
        for (base, body) in stages_map {
            resolver.add_stage(base, body);
        }
        resolver.expand();
        let stages = resolver.finish()?;
        let digest = hex(&Sha256::digest(text.as_bytes()));
        Ok(Pipeline {
            file: file.to_path_buf(),
            name,
            digest,
            workdir,
            params,
            profile: options.profile.clone(),
            stages,
        })
    }

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// Names matching `pattern`: an exact name, or a base name standing for all its expansions.
    pub fn select(&self, pattern: &str) -> Vec<&str> {
        self.stages
            .iter()
            .filter(|s| s.name == pattern || s.base == pattern)
            .map(|s| s.name.as_str())
            .collect()
    }

    /// All stage names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.stages.iter().map(|s| s.name.as_str())
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn err<S: AsRef<str>>(map: &SourceMap, path: &[S], message: impl Into<String>) -> SpecError {
    SpecError {
        span: map.value(path),
        message: message.into(),
        help: None,
    }
}

fn finish(diag: &mut Vec<SpecError>) -> Result<(), LoadError> {
    if diag.is_empty() {
        Ok(())
    } else {
        Err(LoadError::Spec(std::mem::take(diag)))
    }
}

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

fn to_json(
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

fn as_object<'a>(
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

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn check_keys<S: AsRef<str>>(
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

fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    items
        .into_iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Deep merge: mappings merge key by key, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn apply_profile(doc: &mut Value, map: &mut SourceMap, profile: &str) -> Result<(), LoadError> {
    let profiles = doc
        .get("profiles")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let Some(body) = profiles.get(profile) else {
        let names: Vec<&str> = profiles.keys().map(String::as_str).collect();
        return Err(SpecError {
            span: Span::arg(format!("--profile {profile}")),
            message: if names.is_empty() {
                "the pipeline defines no `profiles:`".to_owned()
            } else {
                format!(
                    "unknown profile `{profile}`; the pipeline defines {}",
                    list(names.iter().copied())
                )
            },
            help: suggest(profile, names.iter().copied()).map(|s| format!("did you mean `{s}`?")),
        }
        .into());
    };
    let base: Vec<String> = vec!["profiles".into(), profile.into()];
    let body = body.as_object().ok_or_else(|| {
        err(
            map,
            &base,
            "a profile must be a mapping with `params:` and/or `stages:`",
        )
    })?;
    let mut diag = Vec::new();
    check_keys(
        body,
        PROFILE_KEYS,
        map,
        &base,
        &format!("in profile `{profile}`"),
        &mut diag,
    );
    finish(&mut diag)?;
    let own = map.clone();
    if let Some(patch) = body.get("params") {
        let mut from = base.clone();
        from.push("params".into());
        check_known_params(
            doc.get("params").unwrap_or(&Value::Null),
            patch,
            &own,
            &from,
            &mut diag,
        );
        finish(&mut diag)?;
        merge_params(doc, patch);
        map.graft(&own, &from, &["params".to_owned()]);
    }
    if let Some(stages_patch) = body.get("stages") {
        let mut from = base.clone();
        from.push("stages".into());
        let patches = stages_patch.as_object().ok_or_else(|| {
            err(
                &own,
                &from,
                "profile `stages:` must map `stage` or `stage.field` to values",
            )
        })?;
        for (target, patch) in patches {
            let path: Vec<String> = target.split('.').map(str::to_owned).collect();
            let stage_names: Vec<String> = doc
                .get("stages")
                .and_then(Value::as_object)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            if !stage_names.contains(&path[0]) {
                let mut key_path = from.clone();
                key_path.push(target.clone());
                diag.push(SpecError {
                    span: own.key(&key_path),
                    message: format!("profile `{profile}` overrides unknown stage `{}`", path[0]),
                    help: suggest(&path[0], stage_names.iter().map(String::as_str))
                        .map(|s| format!("did you mean `{s}`?")),
                });
                continue;
            }
            let mut slot = doc.get_mut("stages").expect("checked");
            for segment in &path {
                let obj = match slot {
                    Value::Object(o) => o,
                    other => {
                        *other = Value::Object(Map::new());
                        other.as_object_mut().expect("just set")
                    }
                };
                slot = obj
                    .entry(segment.clone())
                    .or_insert(Value::Object(Map::new()));
            }
            merge(slot, patch);
            let mut src = from.clone();
            src.push(target.clone());
            let mut dst = vec!["stages".to_owned()];
            dst.extend(path);
            map.graft(&own, &src, &dst);
        }
        finish(&mut diag)?;
    }
    Ok(())
}

/// Deep-merges `patch` into the document's `params:`.
fn merge_params(doc: &mut Value, patch: &Value) {
    let params = doc
        .as_object_mut()
        .expect("checked to be a mapping")
        .entry("params");
    merge(params.or_insert(Value::Object(Map::new())), patch);
}

/// Params files and `--set` may only change params the pipeline declares: a typo must not
/// silently add a new one.
fn check_known_params(
    existing: &Value,
    patch: &Value,
    map: &SourceMap,
    path: &[String],
    diag: &mut Vec<SpecError>,
) {
    let (Some(existing), Some(patch)) = (existing.as_object(), patch.as_object()) else {
        return;
    };
    for (k, v) in patch {
        let mut p = path.to_vec();
        p.push(k.clone());
        match existing.get(k) {
            Some(e) => check_known_params(e, v, map, &p, diag),
            None => diag.push(SpecError {
                span: map.key(&p),
                message: format!(
                    "unknown param `{k}`; the pipeline declares {}",
                    list(existing.keys().map(String::as_str))
                ),
                help: suggest(k, existing.keys().map(String::as_str))
                    .map(|s| format!("did you mean `{s}`?")),
            }),
        }
    }
}

fn apply_params_file(doc: &mut Value, map: &mut SourceMap, file: &Path) -> Result<(), LoadError> {
    let text = std::fs::read_to_string(file).map_err(|source| LoadError::Read {
        path: file.display().to_string(),
        source,
    })?;
    let shown = file.display().to_string();
    let patch = parse_yaml(&shown, &text)?;
    let own = SourceMap::parse(&shown, &text);
    if !patch.is_object() {
        return Err(err(
            &own,
            &[] as &[&str],
            "a params file must be a mapping of param names to values",
        )
        .into());
    }
    let mut diag = Vec::new();
    check_known_params(
        doc.get("params").unwrap_or(&Value::Null),
        &patch,
        &own,
        &[],
        &mut diag,
    );
    finish(&mut diag)?;
    merge_params(doc, &patch);
    map.graft(&own, &[], &["params".to_owned()]);
    Ok(())
}

/// `--set a.b=1` sets a pipeline param; `--set sft.with.lr=3e-5` (or `stages.sft...`)
/// sets a stage field.
fn apply_set(doc: &mut Value, map: &mut SourceMap, set: &str) -> Result<(), LoadError> {
    let span = Span::arg(format!("--set {set}"));
    let Some((lhs, rhs)) = set.split_once('=') else {
        return Err(SpecError {
            span,
            message: "expected `--set path=value`, e.g. `--set seed=7`".into(),
            help: None,
        }
        .into());
    };
    let value: Value = match serde_yaml::from_str::<serde_yaml::Value>(rhs) {
        Ok(v) => to_json(v, &SourceMap::empty("--set"), &mut Vec::new())
            .unwrap_or(Value::String(rhs.to_owned())),
        Err(_) => Value::String(rhs.to_owned()),
    };
    let mut path: Vec<String> = lhs.trim().split('.').map(str::to_owned).collect();
    let stage_names: Vec<String> = doc
        .get("stages")
        .and_then(Value::as_object)
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    if path[0] == "stages" || (path[0] != "params" && stage_names.contains(&path[0])) {
        if path[0] != "stages" {
            path.insert(0, "stages".into());
        }
        if path.len() < 3 || !stage_names.contains(&path[1]) {
            return Err(SpecError {
                span,
                message: format!(
                    "`{lhs}` does not name a field of a stage; expected `STAGE.FIELD[.KEY...]`"
                ),
                help: path
                    .get(1)
                    .and_then(|s| suggest(s, stage_names.iter().map(String::as_str)))
                    .map(|s| format!("did you mean `{s}`?")),
            }
            .into());
        }
    } else {
        if path[0] != "params" {
            path.insert(0, "params".into());
        }
        // The param must exist, so a typo is an error rather than a new, unused param.
        let mut cur = doc.get("params").unwrap_or(&Value::Null);
        for (i, seg) in path.iter().enumerate().skip(1) {
            let obj = cur.as_object();
            match obj.and_then(|o| o.get(seg)) {
                Some(next) => cur = next,
                None => {
                    let keys: Vec<&str> = obj
                        .map(|o| o.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    let mut candidates = keys.clone();
                    if i == 1 {
                        candidates.extend(stage_names.iter().map(String::as_str));
                    }
                    return Err(SpecError {
                        span,
                        message: format!(
                            "`{}` is neither a declared param nor a stage; params here are {}",
                            path[1..=i].join("."),
                            list(keys.iter().copied())
                        ),
                        help: suggest(seg, candidates).map(|s| format!("did you mean `{s}`?")),
                    }
                    .into());
                }
            }
        }
    }
    let mut slot = &mut *doc;
    for segment in &path {
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        slot = slot
            .as_object_mut()
            .expect("object")
            .entry(segment.clone())
            .or_insert(Value::Null);
    }
    *slot = value;
    map.set_point(&path, span);
    Ok(())
}

/// Resolves `${params.x}` references between params (in passes, so order does not matter).
fn resolve_params(mut params: Value, map: &SourceMap) -> Result<Value, LoadError> {
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
fn walk_path<'v>(root: &'v Value, dotted: &str, root_name: &str) -> Result<&'v Value, LookupError> {
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

/// One stage instance before resolution.
struct Instance {
    name: String,
    base: String,
    body: Map<String, Value>,
    item: Option<Value>,
    key: Option<Value>,
}

struct Resolver<'a> {
    map: &'a SourceMap,
    params: &'a Value,
    registry: &'a Registry,
    raw: Vec<(String, Value)>,
    instances: Vec<Instance>,
    /// Resolved fields per instance name.
    resolved: HashMap<String, Map<String, Value>>,
    resolving: Vec<String>,
    diag: Vec<SpecError>,
}

impl<'a> Resolver<'a> {
    fn new(map: &'a SourceMap, params: &'a Value, registry: &'a Registry) -> Self {
        Resolver {
            map,
            params,
            registry,
            raw: Vec::new(),
            instances: Vec::new(),
            resolved: HashMap::new(),
            resolving: Vec::new(),
            diag: Vec::new(),
        }
    }

    fn add_stage(&mut self, base: &str, body: &Value) {
        self.raw.push((base.to_owned(), body.clone()));
    }

    fn spath(&self, base: &str, rest: &[&str]) -> Vec<String> {
        let mut p = vec!["stages".to_owned(), base.to_owned()];
        p.extend(rest.iter().map(|s| (*s).to_owned()));
        p
    }

    fn error(&mut self, path: Vec<String>, message: String, help: Option<String>) {
        self.diag.push(SpecError {
            span: self.map.value(&path),
            message,
            help,
        });
    }

    /// Checks stage keys and expands `foreach` / `matrix`.
    fn expand(&mut self) {
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

    /// Interpolates one instance's fields, resolving other stages' `with` on demand.
    fn resolve(&mut self, name: &str) -> Option<Map<String, Value>> {
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

    fn finish(mut self) -> Result<Vec<StageSpec>, LoadError> {
        finish(&mut self.diag)?;
        let names: Vec<String> = self.instances.iter().map(|i| i.name.clone()).collect();
        let mut specs: Vec<StageSpec> = Vec::new();
        for name in &names {
            let Some(fields) = self.resolve(name) else {
                continue;
            };
            let base = self
                .instances
                .iter()
                .find(|i| &i.name == name)
                .map(|i| i.base.clone())
                .unwrap_or_default();
            if let Some(spec) = self.build(name, &base, fields) {
                specs.push(spec);
            }
        }
        finish(&mut self.diag)?;
        self.link(&mut specs);
        finish(&mut self.diag)?;
        Ok(specs)
    }

    /// Kind, params and declaration of one resolved stage.
    fn build(&mut self, name: &str, base: &str, fields: Map<String, Value>) -> Option<StageSpec> {
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
    fn link(&mut self, specs: &mut [StageSpec]) {
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

/// Splits `NAME.outputs.OUT` / `NAME.with.A.B` (NAME may contain dots after an `@`).
fn split_stage_ref(rest: &str) -> Option<(&str, &str, Option<&str>)> {
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

    #[test]
    fn merge_is_deep() {
        let mut a = serde_json::json!({"x": {"y": 1, "z": 2}, "l": [1]});
        merge(&mut a, &serde_json::json!({"x": {"y": 3}, "l": [2, 3]}));
        assert_eq!(a, serde_json::json!({"x": {"y": 3, "z": 2}, "l": [2, 3]}));
    }
}
