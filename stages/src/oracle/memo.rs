//! Oracle replies on disk, one small JSON file per key (`ab/abcdef….json`),
//! written atomically; a reply is durable before the item counts as answered.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One memoised reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The raw text.
    pub text: String,
    /// Prompt tokens billed.
    pub prompt_tokens: usize,
    /// Completion tokens billed.
    pub completion_tokens: usize,
    /// What it cost.
    pub cost_usd: f64,
}

/// A directory of replies.
#[derive(Debug, Clone)]
pub struct Memo {
    dir: PathBuf,
}

impl Memo {
    /// Replies under `dir` (created on first write).
    pub fn new(dir: PathBuf) -> Memo {
        Memo { dir }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    /// The reply stored under `key`; a torn or unreadable file counts as absent.
    pub fn get(&self, key: &str) -> Option<Reply> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores a reply (atomic, fsynced).
    pub fn put(&self, key: &str, reply: &Reply) -> std::io::Result<()> {
        let path = self.path(key);
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        crate::fsio::write_json_atomic(&path, reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = Memo::new(dir.path().join("oracle"));
        let key = "ab".repeat(32);
        assert_eq!(m.get(&key), None);
        let r = Reply {
            text: "{\"a\": 1}".into(),
            prompt_tokens: 3,
            completion_tokens: 4,
            cost_usd: 0.5,
        };
        m.put(&key, &r).unwrap();
        assert_eq!(m.get(&key), Some(r));
        std::fs::write(m.path(&key), b"{\"text\": \"trunc").unwrap();
        assert_eq!(m.get(&key), None);
    }
}
