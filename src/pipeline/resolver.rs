//! The [`Resolver`]: the state shared by expansion ([`super::expand`]), interpolation
//! ([`super::resolve`]) and validation ([`super::validate`]) of the `stages:` mapping, and
//! the order they run in ([`Resolver::finish`]). Each concern adds its methods in its own
//! file; problems are collected in `diag` so one load reports every error it can find.

use std::collections::HashMap;

use pipe_stages::Registry;
use serde_json::{Map, Value};

use super::source_map::SourceMap;
use super::{finish, LoadError, SpecError, StageSpec};

/// One stage instance before resolution.
pub(super) struct Instance {
    pub(super) name: String,
    pub(super) base: String,
    pub(super) body: Map<String, Value>,
    pub(super) item: Option<Value>,
    pub(super) key: Option<Value>,
}

pub(super) struct Resolver<'a> {
    pub(super) map: &'a SourceMap,
    pub(super) params: &'a Value,
    pub(super) registry: &'a Registry,
    pub(super) raw: Vec<(String, Value)>,
    pub(super) instances: Vec<Instance>,
    /// Resolved fields per instance name.
    pub(super) resolved: HashMap<String, Map<String, Value>>,
    pub(super) resolving: Vec<String>,
    pub(super) diag: Vec<SpecError>,
}

impl<'a> Resolver<'a> {
    pub(super) fn new(map: &'a SourceMap, params: &'a Value, registry: &'a Registry) -> Self {
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

    pub(super) fn add_stage(&mut self, base: &str, body: &Value) {
        self.raw.push((base.to_owned(), body.clone()));
    }

    pub(super) fn spath(&self, base: &str, rest: &[&str]) -> Vec<String> {
        let mut p = vec!["stages".to_owned(), base.to_owned()];
        p.extend(rest.iter().map(|s| (*s).to_owned()));
        p
    }

    pub(super) fn error(&mut self, path: Vec<String>, message: String, help: Option<String>) {
        self.diag.push(SpecError {
            span: self.map.value(&path),
            message,
            help,
        });
    }

    /// Expands, resolves and validates every stage, then checks the references between
    /// them; every problem found is returned together.
    pub(super) fn finish(mut self) -> Result<Vec<StageSpec>, LoadError> {
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
}
