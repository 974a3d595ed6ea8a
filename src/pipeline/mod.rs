//! Pipeline files: from YAML text to a validated [`Pipeline`], a flat list of
//! [`StageSpec`]s whose params are resolved JSON, ready for planning and fingerprinting.
//!
//! [`Pipeline::load`] runs the steps in order, one file per concern:
//! `yaml` parses the text (with [`source_map`] keeping every value's place),
//! `overrides` applies `--profile`, `-p` files and `--set`, `resolve` interpolates
//! `${...}` (syntax in [`interpolate`]) into params and stages, `expand` turns
//! `foreach`/`matrix` into instances, and `validate` checks each stage against its
//! kind's typed params and the references between stages; `resolver` holds the state
//! those last three share. Every problem found on the way is a [`SpecError`] that names
//! the place (`file:line:col`), what was expected and, where a near miss exists, a
//! "did you mean".

mod expand;
pub mod interpolate;
mod overrides;
mod resolve;
mod resolver;
pub mod source_map;
mod validate;
mod yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use pipe_stages::{Registry, Signature};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

use overrides::{apply_params_file, apply_profile, apply_set};
use resolve::resolve_params;
use resolver::Resolver;
use source_map::SourceMap;
pub use source_map::Span;
pub use yaml::parse_yaml;
use yaml::{as_object, check_keys};

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "workdir",
    "params",
    "profiles",
    "stages",
    "tracking",
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
    /// `tracking:` (MLflow); `--track` can add or replace it.
    pub tracking: crate::tracking::TrackingConfig,
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
        let tracking = tracking_config(top.get("tracking"), &map)?;
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
            tracking,
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

/// `tracking: {mlflow: URI, experiment: NAME}`.
fn tracking_config(
    value: Option<&Value>,
    map: &SourceMap,
) -> Result<crate::tracking::TrackingConfig, SpecError> {
    let mut config = crate::tracking::TrackingConfig::default();
    let Some(value) = value else {
        return Ok(config);
    };
    let Value::Object(obj) = value else {
        return Err(err(
            map,
            &["tracking"],
            "expected `tracking:` to be a mapping like `{mlflow: http://127.0.0.1:5000, experiment: NAME}`",
        ));
    };
    for (k, v) in obj {
        let text = |what: &str| -> Result<String, SpecError> {
            match v {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(err(
                    map,
                    &["tracking", k.as_str()],
                    format!("expected `{k}:` to be {what}"),
                )),
            }
        };
        match k.as_str() {
            "mlflow" => {
                let uri = text("the tracking server's URI, http://HOST:PORT")?;
                if !(uri.starts_with("http://") || uri.starts_with("https://")) {
                    return Err(err(
                        map,
                        &["tracking", "mlflow"],
                        format!(
                            "`{}` is not an http(s) URI; expected http://HOST:PORT",
                            crate::tracking::shown_uri(&uri)
                        ),
                    ));
                }
                config.mlflow = Some(uri);
            }
            "experiment" => config.experiment = Some(text("an experiment name")?),
            other => {
                let help = pipe_stages::suggest(other, ["mlflow", "experiment"]);
                return Err(SpecError {
                    span: map.key(&["tracking", other]),
                    message: format!(
                        "unknown key `{other}` in `tracking:`; expected `mlflow` or `experiment`"
                    ),
                    help: help.map(|h| format!("did you mean `{h}`?")),
                });
            }
        }
    }
    Ok(config)
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
