//! Where every key and value of a YAML document was written, so that errors found long
//! after parsing (a bad param, a dangling reference) can still name `file:line:col`.
//!
//! serde_yaml gives values without positions; this map is built from yaml-rust2's marked
//! events over the same text and indexed by the path of keys (and list indices) from the
//! document root.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A place in a source: a file position, or a command-line argument (line 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The file path as the user gave it, or a description such as `--set a=1`.
    pub file: Arc<str>,
    /// 1-based line, 0 when the source is not a file.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

impl Span {
    /// A span for something given on the command line.
    pub fn arg(text: impl Into<String>) -> Self {
        Self {
            file: Arc::from(text.into()),
            line: 0,
            col: 0,
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}:{}", self.file, self.line, self.col)
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    key: Span,
    value: Span,
}

/// Key and value positions by path.
#[derive(Debug, Clone)]
pub struct SourceMap {
    file: Arc<str>,
    entries: HashMap<Vec<String>, Entry>,
}

impl SourceMap {
    /// Indexes `text`, a YAML document read from `file`. Syntax errors are left to
    /// serde_yaml, which reports them with their own location; a map that cannot be built
    /// is simply empty.
    pub fn parse(file: &str, text: &str) -> Self {
        let file: Arc<str> = Arc::from(file);
        let mut builder = Builder {
            file: file.clone(),
            stack: Vec::new(),
            entries: HashMap::new(),
        };
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut builder, false);
        SourceMap {
            file,
            entries: builder.entries,
        }
    }

    /// A map that knows only its file name (for documents built in memory).
    pub fn empty(file: &str) -> Self {
        SourceMap {
            file: Arc::from(file),
            entries: HashMap::new(),
        }
    }

    /// The start of the file.
    pub fn start(&self) -> Span {
        Span {
            file: self.file.clone(),
            line: 1,
            col: 1,
        }
    }

    /// The position of the value at `path`, or of its nearest ancestor that has one.
    pub fn value<S: AsRef<str>>(&self, path: &[S]) -> Span {
        self.lookup(path, |e| e.value.clone())
    }

    /// The position of the key at the end of `path`, or of its nearest ancestor.
    pub fn key<S: AsRef<str>>(&self, path: &[S]) -> Span {
        self.lookup(path, |e| e.key.clone())
    }

    fn lookup<S: AsRef<str>>(&self, path: &[S], pick: impl Fn(&Entry) -> Span) -> Span {
        let mut owned: Vec<String> = path.iter().map(|s| s.as_ref().to_owned()).collect();
        loop {
            if let Some(e) = self.entries.get(&owned) {
                return pick(e);
            }
            if owned.pop().is_none() {
                return Span {
                    file: self.file.clone(),
                    line: 1,
                    col: 1,
                };
            }
        }
    }

    /// Copies every position under `from` in `other` to the same relative place under `to`
    /// here: used when a profile or a params file overrides part of the pipeline.
    pub fn graft(&mut self, other: &SourceMap, from: &[String], to: &[String]) {
        for (path, entry) in &other.entries {
            if path.len() >= from.len() && path[..from.len()] == *from {
                let mut target = to.to_vec();
                target.extend_from_slice(&path[from.len()..]);
                self.entries.insert(target, entry.clone());
            }
        }
    }

    /// Marks everything at and under `path` as coming from `span` (a `--set` argument).
    pub fn set_point(&mut self, path: &[String], span: Span) {
        self.entries
            .retain(|p, _| !(p.len() >= path.len() && p[..path.len()] == *path));
        self.entries.insert(
            path.to_vec(),
            Entry {
                key: span.clone(),
                value: span,
            },
        );
    }
}

enum Frame {
    Mapping {
        path: Vec<String>,
        pending_key: Option<(String, Marker)>,
    },
    Sequence {
        path: Vec<String>,
        index: usize,
    },
}

struct Builder {
    file: Arc<str>,
    stack: Vec<Frame>,
    entries: HashMap<Vec<String>, Entry>,
}

impl Builder {
    fn span(&self, m: Marker) -> Span {
        Span {
            file: self.file.clone(),
            line: m.line(),
            col: m.col() + 1,
        }
    }

    /// Called for each value (scalar, alias, or the start of a collection); returns the
    /// path at which it sits, or None when it is a mapping key.
    fn place_value(&mut self, mark: Marker, key_text: Option<&str>) -> Option<Vec<String>> {
        let value_span = self.span(mark);
        match self.stack.last_mut() {
            None => {
                self.entries.insert(
                    Vec::new(),
                    Entry {
                        key: value_span.clone(),
                        value: value_span,
                    },
                );
                Some(Vec::new())
            }
            Some(Frame::Sequence { path, index }) => {
                let mut p = path.clone();
                p.push(index.to_string());
                *index += 1;
                self.entries.insert(
                    p.clone(),
                    Entry {
                        key: value_span.clone(),
                        value: value_span,
                    },
                );
                Some(p)
            }
            Some(Frame::Mapping { path, pending_key }) => match pending_key.take() {
                None => {
                    *pending_key = Some((key_text.unwrap_or("?").to_owned(), mark));
                    None
                }
                Some((key, key_mark)) => {
                    let mut p = path.clone();
                    p.push(key);
                    let key_span = Span {
                        file: value_span.file.clone(),
                        line: key_mark.line(),
                        col: key_mark.col() + 1,
                    };
                    self.entries.insert(
                        p.clone(),
                        Entry {
                            key: key_span,
                            value: value_span,
                        },
                    );
                    Some(p)
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => {
                self.place_value(mark, Some(&text));
            }
            Event::Alias(_) => {
                self.place_value(mark, Some("*alias"));
            }
            Event::MappingStart(..) => {
                let path = self
                    .place_value(mark, Some("?"))
                    .unwrap_or_else(|| vec!["?".into()]);
                self.stack.push(Frame::Mapping {
                    path,
                    pending_key: None,
                });
            }
            Event::SequenceStart(..) => {
                let path = self
                    .place_value(mark, Some("?"))
                    .unwrap_or_else(|| vec!["?".into()]);
                self.stack.push(Frame::Sequence { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let text =
            "name: x\nstages:\n  split:\n    uses: split\n    with: {seed: 3, ratios: [1, 2]}\n";
        let m = SourceMap::parse("p.yaml", text);
        assert_eq!(
            m.key(&["stages", "split", "uses"]).to_string(),
            "p.yaml:4:5"
        );
        assert_eq!(
            m.value(&["stages", "split", "uses"]).to_string(),
            "p.yaml:4:11"
        );
        assert_eq!(
            m.value(&["stages", "split", "with", "seed"]).to_string(),
            "p.yaml:5:18"
        );
        assert_eq!(
            m.value(&["stages", "split", "with", "ratios", "1"])
                .to_string(),
            "p.yaml:5:33"
        );
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(
            m.value(&["stages", "split", "with", "nope"]).to_string(),
            "p.yaml:5:11"
        );
    }
}
