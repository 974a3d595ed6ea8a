//! Typed parameters: each stage deserializes its `with:` block into its own struct and
//! reports errors with the path of the offending field and the accepted alternatives.

use serde::de::DeserializeOwned;
use serde_json::Value;

/// A rejected parameter, located by its path inside the `with:` block.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// Keys (and list indices) from the `with:` block down to the offending value; empty for
    /// the block itself.
    pub path: Vec<String>,
    /// What is wrong and what was expected.
    pub message: String,
    /// A "did you mean" suggestion, when one is close enough.
    pub help: Option<String>,
}

impl ParamError {
    /// An error at `path` with `message`.
    pub fn new(path: &[&str], message: impl Into<String>) -> Self {
        Self {
            path: path.iter().map(|s| (*s).to_owned()).collect(),
            message: message.into(),
            help: None,
        }
    }
}

/// Deserializes a `with:` block into `T`, turning serde's message into a [`ParamError`]
/// with the field path and, for unknown keys, a suggestion among the valid ones.
pub fn parse_params<T: DeserializeOwned>(value: &Value) -> Result<T, ParamError> {
    serde_path_to_error::deserialize(value).map_err(|err| {
        let mut path: Vec<String> = Vec::new();
        for segment in err.path().iter() {
            match segment {
                serde_path_to_error::Segment::Map { key } => path.push(key.clone()),
                serde_path_to_error::Segment::Seq { index } => path.push(index.to_string()),
                serde_path_to_error::Segment::Enum { variant } => path.push(variant.clone()),
                serde_path_to_error::Segment::Unknown => {}
            }
        }
        let message = err.inner().to_string();
        let help = unknown_field_help(&message);
        ParamError {
            path,
            message,
            help,
        }
    })
}

/// serde says "unknown field `lrr`, expected one of `lr`, `seed`": turn that into a hint.
fn unknown_field_help(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (found, rest) = rest.split_once('`')?;
    let candidates: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    suggest(found, candidates).map(|s| format!("did you mean `{s}`?"))
}

/// The closest candidate to `found`, if any is close enough to be a likely typo.
pub fn suggest<'a>(found: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // Close by Jaro-Winkler (good for long names and shared prefixes), or within a small
    // edit distance counting transpositions (good for short names: `tga` → `tag`).
    let max_edits = (found.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| {
            let jw = strsim::jaro_winkler(found, c);
            let close =
                found.chars().count() >= 3 && strsim::damerau_levenshtein(found, c) <= max_edits;
            (if close { jw.max(0.8) } else { jw }, c)
        })
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct P {
        seed: u64,
        ratios: Inner,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        train: f64,
    }

    #[test]
    fn unknown_field_has_path_and_suggestion() {
        let err = parse_params::<P>(&serde_json::json!({"seed": 1, "ratios": {"trian": 0.5}}))
            .unwrap_err();
        assert_eq!(err.path, vec!["ratios", "trian"]);
        assert_eq!(err.help.as_deref(), Some("did you mean `train`?"));
    }

    #[test]
    fn wrong_type_names_field() {
        let err = parse_params::<P>(&serde_json::json!({"seed": "x", "ratios": {"train": 1.0}}))
            .unwrap_err();
        assert_eq!(err.path, vec!["seed"]);
        assert!(err.message.contains("expected u64"), "{}", err.message);
    }
}

/// The learning-rate schedule of a training stage (`schedule:` of `sft`, `head_train`):
/// linear warmup for `warmup_steps`, or `warmup_ratio` of the steps when that is 0,
/// then `decay`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Warmup steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Warmup as a share of the steps (used when `warmup_steps` is 0), e.g. 0.03.
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Decay after warmup.
    #[serde(default = "cosine")]
    pub decay: pipe_train::optim::Decay,
}

fn cosine() -> pipe_train::optim::Decay {
    pipe_train::optim::Decay::Cosine
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            warmup_steps: 0,
            warmup_ratio: 0.0,
            decay: cosine(),
        }
    }
}

impl Schedule {
    /// Warmup steps for a run of `steps`.
    pub fn warmup(&self, steps: u64) -> u64 {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * steps as f64).ceil() as u64
        }
    }
}
