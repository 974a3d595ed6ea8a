//! Filters: a multi-dimensional scoring rubric as users write it (YAML), and the one
//! function that turns per-dimension scores into an overall score and a tier.
//!
//! ```yaml
//! name: uplifting
//! dimensions:
//!   agency: {weight: 2, description: "people act to improve things", scale: "0 none … 10 decisive"}
//!   wonder: {weight: 1, description: "...", scale: "..."}
//! gatekeepers:
//!   - {dimension: collective_benefit, below: 5, cap: 3, unless: {dimension: wonder, at_least: 7}}
//! content_caps: {corporate_finance: 2}
//! tiers:
//!   - {name: impact, min: 7}
//!   - {name: connection, min: 4}
//!   - {name: not_uplifting, min: 0}
//! ```
//!
//! [`Filter::assess`] is the only place the overall score is computed: the weighted
//! mean of the dimensions (weights as given, normalised to sum to 1), then every
//! gatekeeper whose dimension is below its bound caps it (unless its exception
//! holds), then the content type's cap; the tier is the first whose `min` the capped
//! score reaches. The split, the gates and the metrics all call it, so no stage can
//! use an unweighted mean where another uses the weighted one.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One scored dimension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimension {
    /// Relative weight in the overall score (positive).
    pub weight: f64,
    /// What it measures (shown to the oracle).
    #[serde(default)]
    pub description: String,
    /// How 0–10 reads (shown to the oracle).
    #[serde(default)]
    pub scale: String,
}

/// A condition on one dimension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtLeast {
    /// The dimension.
    pub dimension: String,
    /// The bound it must reach.
    pub at_least: f64,
}

/// A gatekeeper rule: a dimension below `below` caps the overall score at `cap`,
/// unless the exception holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gatekeeper {
    /// The dimension.
    pub dimension: String,
    /// Scores strictly below this trigger the cap.
    pub below: f64,
    /// The cap.
    pub cap: f64,
    /// No cap when this holds.
    #[serde(default)]
    pub unless: Option<AtLeast>,
}

/// A tier: scores at or above `min` (and below the tier above).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Its name.
    pub name: String,
    /// Lowest overall score of the tier.
    pub min: f64,
}

/// A filter file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Its name.
    pub name: String,
    /// What the filter looks for (shown to the oracle).
    #[serde(default)]
    pub description: String,
    /// Dimensions in the order given (the order of the head's outputs).
    pub dimensions: indexmap_like::Ordered<Dimension>,
    /// Gatekeeper rules.
    #[serde(default)]
    pub gatekeepers: Vec<Gatekeeper>,
    /// Overall caps by content type.
    #[serde(default)]
    pub content_caps: BTreeMap<String, f64>,
    /// Tiers from the highest.
    pub tiers: Vec<Tier>,
}

/// What [`Filter::assess`] gives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    /// Weighted mean of the dimensions, before caps.
    pub weighted: f64,
    /// After gatekeepers and the content cap.
    pub overall: f64,
    /// The tier of `overall`.
    pub tier: String,
    /// The rules that lowered the score, in order.
    pub capped_by: Vec<String>,
}

/// Dimension maps that keep the file's order.
pub mod indexmap_like {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// `(name, value)` pairs in file order.
    #[derive(Debug, Clone, PartialEq)]
    pub struct Ordered<T>(pub Vec<(String, T)>);

    impl<T: Serialize> Serialize for Ordered<T> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in &self.0 {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }

    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V<T>(std::marker::PhantomData<T>);
            impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
                type Value = Ordered<T>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a map of dimension name to its definition")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut a: A,
                ) -> Result<Ordered<T>, A::Error> {
                    let mut out: Vec<(String, T)> = Vec::new();
                    while let Some((k, v)) = a.next_entry::<String, T>()? {
                        if out.iter().any(|(n, _)| *n == k) {
                            return Err(serde::de::Error::custom(format!(
                                "dimension `{k}` is defined twice"
                            )));
                        }
                        out.push((k, v));
                    }
                    Ok(Ordered(out))
                }
            }
            d.deserialize_map(V(std::marker::PhantomData))
        }
    }
}

/// The lowest and highest score a dimension takes.
pub const SCALE: (f64, f64) = (0.0, 10.0);

impl Filter {
    /// Reads and checks a filter file; errors name the file, the field and, for
    /// syntax, the line and column.
    pub fn load(path: &Path) -> Result<Filter, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the filter: {e}", path.display()))?;
        Filter::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks filter YAML.
    pub fn parse(text: &str) -> Result<Filter, String> {
        let de = serde_yaml::Deserializer::from_str(text);
        let f: Filter = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let at = inner
                .location()
                .map(|l| format!("{}:{}: ", l.line(), l.column()))
                .unwrap_or_default();
            format!("{at}{path}: {inner}")
        })?;
        f.check()?;
        Ok(f)
    }

    /// Dimension names in order.
    pub fn names(&self) -> Vec<&str> {
        self.dimensions.0.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn known(&self, field: &str, name: &str) -> Result<(), String> {
        if self.dimensions.0.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let hint = crate::params::suggest(name, self.names())
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        Err(format!(
            "{field}: unknown dimension `{name}`{hint}; the dimensions are {}",
            self.names().join(", ")
        ))
    }

    fn check(&self) -> Result<(), String> {
        if self.dimensions.0.is_empty() {
            return Err("dimensions: a filter needs at least one dimension".into());
        }
        for (n, d) in &self.dimensions.0 {
            if !(d.weight > 0.0 && d.weight.is_finite()) {
                return Err(format!(
                    "dimensions.{n}.weight: expected a positive number, got {}",
                    d.weight
                ));
            }
        }
        for (i, g) in self.gatekeepers.iter().enumerate() {
            self.known(&format!("gatekeepers[{i}].dimension"), &g.dimension)?;
            if let Some(u) = &g.unless {
                self.known(&format!("gatekeepers[{i}].unless.dimension"), &u.dimension)?;
            }
        }
        if self.tiers.is_empty() {
            return Err("tiers: a filter needs at least one tier".into());
        }
        for (i, w) in self.tiers.windows(2).enumerate() {
            if w[1].min >= w[0].min {
                return Err(format!(
                    "tiers[{}]: tier `{}` starts at {} but the tier above it, `{}`, starts at {}: tiers overlap; list them from the highest threshold down, each strictly lower",
                    i + 1,
                    w[1].name,
                    w[1].min,
                    w[0].name,
                    w[0].min
                ));
            }
        }
        let lowest = self.tiers.last().expect("checked non-empty");
        if lowest.min > SCALE.0 {
            return Err(format!(
                "tiers[{}]: the lowest tier `{}` starts at {}, so scores from {} up to it have no tier; let it start at {}",
                self.tiers.len() - 1,
                lowest.name,
                lowest.min,
                SCALE.0,
                SCALE.0
            ));
        }
        let mut names: Vec<&str> = self.tiers.iter().map(|t| t.name.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("tiers: `{}` is named twice", w[0]));
        }
        Ok(())
    }

    /// The overall score and tier of per-dimension `scores` (every dimension present)
    /// for an item of `content_type`.
    pub fn assess(&self, scores: &[f64], content_type: Option<&str>) -> Assessment {
        let total: f64 = self.dimensions.0.iter().map(|(_, d)| d.weight).sum();
        let weighted = self
            .dimensions
            .0
            .iter()
            .zip(scores)
            .map(|((_, d), s)| d.weight * s)
            .sum::<f64>()
            / total;
        let at = |name: &str| {
            self.dimensions
                .0
                .iter()
                .position(|(n, _)| n == name)
                .map(|i| scores[i])
                .unwrap_or(f64::NAN)
        };
        let mut overall = weighted;
        let mut capped_by = Vec::new();
        for g in &self.gatekeepers {
            let excused = g
                .unless
                .as_ref()
                .is_some_and(|u| at(&u.dimension) >= u.at_least);
            if at(&g.dimension) < g.below && !excused && overall > g.cap {
                overall = g.cap;
                capped_by.push(format!("{} < {} → cap {}", g.dimension, g.below, g.cap));
            }
        }
        if let Some((t, cap)) = content_type.and_then(|t| self.content_caps.get_key_value(t)) {
            if overall > *cap {
                overall = *cap;
                capped_by.push(format!("content type {t} → cap {cap}"));
            }
        }
        let tier = self
            .tiers
            .iter()
            .find(|t| overall >= t.min)
            .unwrap_or_else(|| self.tiers.last().expect("checked non-empty"))
            .name
            .clone();
        Assessment {
            weighted,
            overall,
            tier,
            capped_by,
        }
    }

    /// The scores and content type of an oracle reply `{content_type, <dim>: 0–10,
    /// reasoning}`: every dimension present, a number within the scale. Errors name
    /// the field.
    pub fn read_reply(&self, reply: &Value) -> Result<(Vec<f64>, Option<String>), String> {
        let obj = reply
            .as_object()
            .ok_or_else(|| format!("expected a JSON object, got {reply}"))?;
        let mut scores = Vec::with_capacity(self.dimensions.0.len());
        for (n, _) in &self.dimensions.0 {
            let v = obj
                .get(n)
                .ok_or_else(|| format!("`{n}`: missing (every dimension needs a score)"))?;
            let x = match v {
                Value::Number(x) => x.as_f64(),
                Value::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            }
            .ok_or_else(|| format!("`{n}`: expected a number from 0 to 10, got {v}"))?;
            if !(SCALE.0..=SCALE.1).contains(&x) {
                return Err(format!("`{n}`: {x} is outside 0–10"));
            }
            scores.push(x);
        }
        let content_type = obj
            .get("content_type")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((scores, content_type))
    }

    /// The JSON schema of the oracle's reply (for constrained decoding): the content
    /// type, an integer 0–10 per dimension, and the reasoning.
    pub fn reply_schema(&self) -> Value {
        let mut props = serde_json::Map::new();
        props.insert("content_type".into(), serde_json::json!({"type": "string"}));
        for (n, _) in &self.dimensions.0 {
            props.insert(
                n.clone(),
                serde_json::json!({"type": "integer", "minimum": 0, "maximum": 10}),
            );
        }
        props.insert("reasoning".into(), serde_json::json!({"type": "string"}));
        let mut required: Vec<String> = vec!["content_type".into()];
        required.extend(self.dimensions.0.iter().map(|(n, _)| n.clone()));
        required.push("reasoning".into());
        serde_json::json!({"type": "object", "properties": props, "required": required})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPLIFTING: &str = r#"
name: uplifting
dimensions:
  agency: {weight: 2}
  collective_benefit: {weight: 2}
  wonder: {weight: 1}
gatekeepers:
  - {dimension: collective_benefit, below: 5, cap: 3, unless: {dimension: wonder, at_least: 7}}
content_caps: {corporate_finance: 2}
tiers:
  - {name: impact, min: 7}
  - {name: connection, min: 4}
  - {name: not_uplifting, min: 0}
"#;

    fn f() -> Filter {
        Filter::parse(UPLIFTING).unwrap()
    }

    #[test]
    fn the_overall_score_is_the_weighted_mean() {
        let a = f().assess(&[9.0, 6.0, 0.0], None);
        assert!((a.weighted - 6.0).abs() < 1e-12, "{a:?}");
        assert_eq!((a.overall, a.tier.as_str()), (6.0, "connection"));
        assert!(a.capped_by.is_empty());
    }

    #[test]
    fn gatekeeper_edges_and_its_exception() {
        let f = f();
        // Exactly at the bound: not below, no cap.
        let a = f.assess(&[10.0, 5.0, 6.0], None);
        assert!(
            a.capped_by.is_empty() && (a.overall - 7.2).abs() < 1e-12,
            "{a:?}"
        );
        assert_eq!(a.tier, "impact");
        // Just below: capped at 3.
        let a = f.assess(&[10.0, 4.999, 6.0], None);
        assert_eq!((a.overall, a.tier.as_str()), (3.0, "not_uplifting"));
        assert_eq!(a.capped_by.len(), 1);
        // The exception at its bound lifts the cap; just under it does not.
        let a = f.assess(&[10.0, 4.0, 7.0], None);
        assert!(a.capped_by.is_empty() && a.overall > 3.0, "{a:?}");
        let a = f.assess(&[10.0, 4.0, 6.999], None);
        assert_eq!(a.overall, 3.0);
        // A score already under the cap is left as it is.
        let a = f.assess(&[1.0, 1.0, 1.0], None);
        assert_eq!((a.overall, a.capped_by.len()), (1.0, 0));
    }

    #[test]
    fn content_caps_apply_after_gatekeepers_and_tiers_start_at_their_min() {
        let f = f();
        let a = f.assess(&[8.0, 8.0, 8.0], Some("corporate_finance"));
        assert_eq!((a.overall, a.tier.as_str()), (2.0, "not_uplifting"));
        assert_eq!(a.capped_by, vec!["content type corporate_finance → cap 2"]);
        // An unknown content type has no cap.
        assert_eq!(f.assess(&[8.0, 8.0, 8.0], Some("news")).overall, 8.0);
        // Tier boundaries: 7 is impact, just under is connection; 4 is connection.
        assert_eq!(f.assess(&[7.0, 7.0, 7.0], None).tier, "impact");
        assert_eq!(f.assess(&[6.99, 6.99, 6.99], None).tier, "connection");
        assert_eq!(f.assess(&[4.0, 8.0, 0.0], None).tier, "connection");
        assert_eq!(f.assess(&[3.0, 5.0, 3.95], None).tier, "not_uplifting");
    }

    #[test]
    fn bad_filters_name_the_field() {
        let e = Filter::parse(&UPLIFTING.replace(
            "{dimension: collective_benefit, below",
            "{dimension: colective_benefit, below",
        ))
        .unwrap_err();
        assert!(
            e.contains("gatekeepers[0].dimension")
                && e.contains("colective_benefit")
                && e.contains("did you mean `collective_benefit`"),
            "{e}"
        );
        let e = Filter::parse(&UPLIFTING.replace("at_least: 7", "at_least: 7}, dimension: x"))
            .unwrap_err();
        assert!(!e.is_empty());
        let e = Filter::parse(
            &UPLIFTING.replace("{name: connection, min: 4}", "{name: connection, min: 7}"),
        )
        .unwrap_err();
        assert!(e.contains("tiers[1]") && e.contains("overlap"), "{e}");
        let e = Filter::parse(&UPLIFTING.replace(
            "{name: not_uplifting, min: 0}",
            "{name: not_uplifting, min: 1}",
        ))
        .unwrap_err();
        assert!(e.contains("no tier"), "{e}");
        let e = Filter::parse(&UPLIFTING.replace("agency: {weight: 2}", "agency: {weight: two}"))
            .unwrap_err();
        assert!(
            e.contains("dimensions") && e.contains("weight") && e.contains(':'),
            "{e}"
        );
        let e = Filter::parse(&UPLIFTING.replace("wonder: {weight: 1}", "wonder: {weight: 0}"))
            .unwrap_err();
        assert!(e.contains("dimensions.wonder.weight"), "{e}");
    }

    #[test]
    fn replies_are_checked_per_dimension() {
        let f = f();
        let ok = serde_json::json!({"content_type": "news", "agency": 3, "collective_benefit": "7", "wonder": 10, "reasoning": "x"});
        assert_eq!(
            f.read_reply(&ok).unwrap(),
            (vec![3.0, 7.0, 10.0], Some("news".to_string()))
        );
        let out = serde_json::json!({"agency": 11, "collective_benefit": 1, "wonder": 1});
        assert!(f
            .read_reply(&out)
            .unwrap_err()
            .contains("`agency`: 11 is outside"));
        let missing = serde_json::json!({"agency": 1, "wonder": 1});
        assert!(f
            .read_reply(&missing)
            .unwrap_err()
            .contains("`collective_benefit`: missing"));
        let text = serde_json::json!({"agency": "high", "collective_benefit": 1, "wonder": 1});
        assert!(f
            .read_reply(&text)
            .unwrap_err()
            .contains("expected a number"));
        let schema = f.reply_schema();
        assert_eq!(schema["properties"]["wonder"]["maximum"], 10);
        assert_eq!(schema["required"][1], "agency");
    }
}
