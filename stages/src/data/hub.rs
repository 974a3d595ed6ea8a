//! `hf:` dataset sources: `{hf: hotpotqa/hotpot_qa, config: distractor, split: validation}`
//! resolved to the dataset's data files (Parquet, or JSON lines) in the local Hugging Face
//! hub cache, the one `huggingface-cli download --repo-type dataset` and `datasets` fill
//! (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`). Without
//! `HF_HUB_OFFLINE`, files missing from the cache are downloaded through `hf-hub`; with it,
//! a dataset that is not there is an error that says how to provide it.
//!
//! A split's files are found by the names the Hub gives them: `CONFIG/SPLIT-00000-of-N.parquet`
//! (datasets stored as Parquet), `CONFIG/SPLIT/0000.parquet` (the Hub's Parquet conversion,
//! revision `refs/convert/parquet`), `CONFIG/NAME-SPLIT.parquet` (older conversions), and for
//! datasets without configs `data/SPLIT-*.parquet` or `SPLIT.jsonl`. The snapshot's commit
//! is part of the stage's key, so a new revision in the cache reruns the stage.

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};

/// One `hf:` source.
#[derive(Debug, Clone, PartialEq)]
pub struct HubDataset {
    /// `org/name`.
    pub id: String,
    /// The dataset's config (subset); `default` when it has none.
    pub config: Option<String>,
    /// `train`, `validation`, `test`…
    pub split: String,
    /// Branch, tag or commit; `main` by default.
    pub revision: String,
}

/// The files of a split in one snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The snapshot's commit.
    pub commit: String,
    /// `(path in the repository, path on disk)`, sorted.
    pub files: Vec<(String, PathBuf)>,
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn cache_root() -> PathBuf {
    match std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => hf_hub::Cache::from_env().path().clone(),
    }
}

impl HubDataset {
    fn repo(&self) -> Repo {
        Repo::with_revision(self.id.clone(), RepoType::Dataset, self.revision.clone())
    }

    fn config_dir(&self) -> &str {
        self.config.as_deref().unwrap_or("default")
    }

    /// Whether `rel` (a path in the repository) holds this split's data.
    pub fn matches(&self, rel: &str) -> bool {
        let (dir, file) = rel.rsplit_once('/').unwrap_or(("", rel));
        let Some((stem, ext)) = file.rsplit_once('.') else {
            return false;
        };
        if !["parquet", "jsonl", "json"].contains(&ext) {
            return false;
        }
        let split = self.split.as_str();
        let named = stem == split
            || stem.starts_with(&format!("{split}-"))
            || stem.ends_with(&format!("-{split}"));
        let config = self.config_dir();
        if dir == config && named || dir == format!("{config}/{split}") {
            return true;
        }
        let configless = self.config.is_none() || config == "default";
        configless && ((dir == "data" || dir.is_empty()) && named || dir == format!("data/{split}"))
    }

    fn described(&self) -> String {
        format!(
            "dataset `{}` (config {}, split {}, revision {})",
            self.id,
            self.config_dir(),
            self.split,
            self.revision
        )
    }

    /// How to put the dataset where this reader looks.
    fn how_to_provide(&self, root: &Path) -> String {
        let include = match &self.config {
            Some(c) => format!("{c}/{}*", self.split),
            None => format!("*{}*", self.split),
        };
        format!(
            "download it where there is network (`huggingface-cli download {} --repo-type dataset --revision {} --include '{include}'`) and copy the hub cache to {} (or set HF_HUB_CACHE / HF_HOME), or point `path:` at the downloaded files",
            self.id,
            self.revision,
            root.display()
        )
    }

    /// The split's files from the local cache, downloading what is missing unless offline.
    pub fn resolve(&self) -> Result<Resolved, String> {
        let root = cache_root();
        if let Some(found) = self.in_cache(&root)? {
            return Ok(found);
        }
        if offline() {
            return Err(format!(
                "{} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set; {}",
                self.described(),
                root.display(),
                self.how_to_provide(&root)
            ));
        }
        self.download(&root).map_err(|e| {
            format!(
                "{}: not in the cache at {}, and downloading failed: {e}; {}",
                self.described(),
                root.display(),
                self.how_to_provide(&root)
            )
        })
    }

    fn in_cache(&self, root: &Path) -> Result<Option<Resolved>, String> {
        let base = root.join(self.repo().folder_name());
        let is_commit =
            self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit());
        let commit = if is_commit {
            self.revision.clone()
        } else {
            match std::fs::read_to_string(base.join("refs").join(&self.revision)) {
                Ok(c) => c.trim().to_string(),
                Err(_) => return Ok(None),
            }
        };
        let snapshot = base.join("snapshots").join(&commit);
        if !snapshot.is_dir() {
            return Ok(None);
        }
        let mut files = Vec::new();
        let mut stack = vec![snapshot.clone()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let rel = p
                    .strip_prefix(&snapshot)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .replace('\\', "/");
                if self.matches(&rel) {
                    files.push((rel, p));
                }
            }
        }
        if files.is_empty() {
            return Ok(None);
        }
        files.sort();
        Ok(Some(Resolved { commit, files }))
    }

    fn download(&self, root: &Path) -> Result<Resolved, String> {
        let api = hf_hub::api::sync::ApiBuilder::new()
            .with_cache_dir(root.to_path_buf())
            .with_progress(false)
            .build()
            .map_err(|e| e.to_string())?;
        let remote = api.repo(self.repo());
        let info = remote.info().map_err(|e| e.to_string())?;
        let mut names: Vec<String> = info
            .siblings
            .iter()
            .map(|s| s.rfilename.clone())
            .filter(|n| self.matches(n))
            .collect();
        names.sort();
        if names.is_empty() {
            return Err(format!(
                "the repository has no data files for config {} and split {}",
                self.config_dir(),
                self.split
            ));
        }
        let mut files = Vec::new();
        for n in names {
            let p = remote.get(&n).map_err(|e| format!("{n}: {e}"))?;
            files.push((n, p));
        }
        Ok(Resolved {
            commit: info.sha,
            files,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(config: Option<&str>, split: &str) -> HubDataset {
        HubDataset {
            id: "hotpotqa/hotpot_qa".into(),
            config: config.map(str::to_owned),
            split: split.into(),
            revision: "main".into(),
        }
    }

    #[test]
    fn split_files_are_found_by_the_hubs_names() {
        let d = ds(Some("distractor"), "validation");
        assert!(d.matches("distractor/validation-00000-of-00001.parquet"));
        assert!(d.matches("distractor/validation/0000.parquet"));
        assert!(d.matches("distractor/hotpot_qa-validation.parquet"));
        assert!(!d.matches("distractor/train-00000-of-00002.parquet"));
        assert!(!d.matches("fullwiki/validation-00000-of-00001.parquet"));
        assert!(!d.matches("distractor/validation-00000-of-00001.arrow"));
        assert!(!d.matches("data/validation-00000-of-00001.parquet"));
        let plain = ds(None, "test");
        assert!(plain.matches("data/test-00000-of-00001.parquet"));
        assert!(plain.matches("test.jsonl"));
        assert!(plain.matches("default/test/0000.parquet"));
        assert!(!plain.matches("data/train-00000-of-00001.parquet"));
        assert!(!plain.matches("README.md"));
    }

    #[test]
    fn a_cached_snapshot_resolves_and_an_absent_one_offline_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("datasets--hotpotqa--hotpot_qa");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(base.join("refs")).unwrap();
        std::fs::write(base.join("refs/main"), commit).unwrap();
        let snap = base.join("snapshots").join(commit).join("distractor");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("validation-00000-of-00001.parquet"), b"PAR1").unwrap();
        std::fs::write(snap.join("train-00000-of-00001.parquet"), b"PAR1").unwrap();
        let found = ds(Some("distractor"), "validation")
            .in_cache(dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(found.commit, commit);
        assert_eq!(found.files.len(), 1);
        assert_eq!(
            found.files[0].0,
            "distractor/validation-00000-of-00001.parquet"
        );
        assert!(ds(Some("fullwiki"), "validation")
            .in_cache(dir.path())
            .unwrap()
            .is_none());
        let help = ds(Some("fullwiki"), "validation").how_to_provide(dir.path());
        assert!(help.contains("huggingface-cli download hotpotqa/hotpot_qa --repo-type dataset"));
        assert!(help.contains("--include 'fullwiki/validation*'"), "{help}");
    }
}
