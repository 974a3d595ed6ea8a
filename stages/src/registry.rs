//! The set of stage kinds a pipeline may `use:`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::contract::Stage;

/// Stage kinds by name. The engine receives one and never names a kind itself.
#[derive(Clone, Default)]
pub struct Registry {
    stages: BTreeMap<&'static str, Arc<dyn Stage>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a kind.
    pub fn register(&mut self, stage: impl Stage + 'static) {
        self.stages.insert(stage.kind(), Arc::new(stage));
    }

    /// The stage of this kind.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Stage>> {
        self.stages.get(kind)
    }

    /// All kind names, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.stages.keys().copied()
    }
}
