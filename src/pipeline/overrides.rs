//! Profiles and overrides, applied to the parsed document before anything is resolved,
//! in this order: `--profile NAME` (deep-merges `profiles.NAME.params` into `params:` and
//! `profiles.NAME.stages` into the named stages), each `-p FILE` (a YAML mapping merged
//! into `params:`), then each `--set path=value` (a pipeline param, or a stage field as
//! `STAGE.with.a.b` / `stages.STAGE...`). Params files and `--set` may only change what the
//! pipeline already declares, so a typo fails instead of adding a param.

use std::path::Path;

use pipe_stages::suggest;
use serde_json::{Map, Value};

use super::source_map::{SourceMap, Span};
use super::yaml::{check_keys, list, parse_yaml, to_json};
use super::{err, finish, LoadError, SpecError, PROFILE_KEYS};

/// Deep merge: mappings merge key by key, anything else replaces.
pub(super) fn merge(target: &mut Value, patch: &Value) {
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

pub(super) fn apply_profile(
    doc: &mut Value,
    map: &mut SourceMap,
    profile: &str,
) -> Result<(), LoadError> {
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

pub(super) fn apply_params_file(
    doc: &mut Value,
    map: &mut SourceMap,
    file: &Path,
) -> Result<(), LoadError> {
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
pub(super) fn apply_set(doc: &mut Value, map: &mut SourceMap, set: &str) -> Result<(), LoadError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_is_deep() {
        let mut a = serde_json::json!({"x": {"y": 1, "z": 2}, "l": [1]});
        merge(&mut a, &serde_json::json!({"x": {"y": 3}, "l": [2, 3]}));
        assert_eq!(a, serde_json::json!({"x": {"y": 3, "z": 2}, "l": [2, 3]}));
    }
}
