//! Content digests of artifacts: sha256 of a file's bytes (equal to `sha256sum`), and for
//! a directory a Merkle hash over its sorted entries. A [`StatCache`] remembers digests of
//! workspace files by (size, mtime, inode), so unchanged files are never read twice.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::pipeline::hex;

/// Whether an artifact is a file or a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    /// A regular file.
    File,
    /// A directory tree.
    Dir,
}

/// What is known of an artifact without reading it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// sha256 hex (Merkle for directories).
    pub digest: String,
    /// File or directory.
    pub kind: ArtifactKind,
    /// Total bytes of its files.
    pub bytes: u64,
    /// Number of files (1 for a file).
    pub files: u64,
}

const BUF: usize = 1 << 20;

/// sha256 of a file's bytes.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Digest of a file or directory, using `cache` for files when given.
pub fn hash_path(path: &Path, mut cache: Option<&mut StatCache>) -> io::Result<ArtifactInfo> {
    // Cache keys are absolute paths; resolving the root once keeps every child absolute.
    let owned;
    let path = if cache.is_some() {
        owned = fs::canonicalize(path)?;
        owned.as_path()
    } else {
        path
    };
    let meta = fs::metadata(path)?;
    if meta.is_dir() {
        hash_dir(path, &mut cache)
    } else {
        let digest = match cache {
            Some(c) => c.file_digest(path, &meta)?,
            None => hash_file(path)?,
        };
        Ok(ArtifactInfo {
            digest,
            kind: ArtifactKind::File,
            bytes: meta.len(),
            files: 1,
        })
    }
}

/// Merkle hash: one line per entry, sorted by name: `f|x|d <digest> <name>\0`.
fn hash_dir(path: &Path, cache: &mut Option<&mut StatCache>) -> io::Result<ArtifactInfo> {
    let mut entries: Vec<(Vec<u8>, PathBuf)> = fs::read_dir(path)?
        .map(|e| e.map(|e| (e.file_name().into_encoded_bytes(), e.path())))
        .collect::<io::Result<_>>()?;
    entries.sort();
    let mut hasher = Sha256::new();
    hasher.update(b"pipe-tree-v1\n");
    let (mut bytes, mut files) = (0u64, 0u64);
    for (name, child) in entries {
        let meta = fs::metadata(&child)?;
        let (tag, info) = if meta.is_dir() {
            ("d", hash_dir(&child, cache)?)
        } else {
            let digest = match cache.as_deref_mut() {
                Some(c) => c.file_digest(&child, &meta)?,
                None => hash_file(&child)?,
            };
            let tag = if meta.mode() & 0o111 != 0 { "x" } else { "f" };
            (
                tag,
                ArtifactInfo {
                    digest,
                    kind: ArtifactKind::File,
                    bytes: meta.len(),
                    files: 1,
                },
            )
        };
        bytes += info.bytes;
        files += info.files;
        hasher.update(tag.as_bytes());
        hasher.update(b" ");
        hasher.update(info.digest.as_bytes());
        hasher.update(b" ");
        hasher.update(&name);
        hasher.update(b"\0");
    }
    Ok(ArtifactInfo {
        digest: hex(&hasher.finalize()),
        kind: ArtifactKind::Dir,
        bytes,
        files,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct StatEntry {
    size: u64,
    mtime_ns: i64,
    ino: u64,
    digest: String,
}

/// File digests by path, valid while size, mtime and inode are unchanged. Saved as a
/// small text file in the store (one line per file), atomically; concurrent writers may
/// drop each other's entries, which only costs a rehash.
#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    entries: HashMap<PathBuf, StatEntry>,
    dirty: bool,
}

impl StatCache {
    /// Loads the cache at `path` (an absent or unreadable file is an empty cache).
    pub fn load(path: &Path) -> Self {
        let mut entries = HashMap::new();
        if let Ok(text) = fs::read_to_string(path) {
            for line in text.lines() {
                let mut parts = line.splitn(5, '\t');
                let (Some(size), Some(mtime), Some(ino), Some(digest), Some(p)) = (
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                    parts.next(),
                ) else {
                    continue;
                };
                if let (Ok(size), Ok(mtime_ns), Ok(ino)) =
                    (size.parse(), mtime.parse(), ino.parse())
                {
                    entries.insert(
                        PathBuf::from(p),
                        StatEntry {
                            size,
                            mtime_ns,
                            ino,
                            digest: digest.to_owned(),
                        },
                    );
                }
            }
        }
        StatCache {
            path: Some(path.to_path_buf()),
            entries,
            dirty: false,
        }
    }

    /// The digest of `file` (an absolute path), read only when its stat changed.
    pub fn file_digest(&mut self, file: &Path, meta: &fs::Metadata) -> io::Result<String> {
        let key = file.to_path_buf();
        let mtime_ns = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        if let Some(e) = self.entries.get(&key) {
            if e.size == meta.len() && e.mtime_ns == mtime_ns && e.ino == meta.ino() {
                return Ok(e.digest.clone());
            }
        }
        let digest = hash_file(file)?;
        // A file modified within the last second could change again within the same
        // mtime tick; do not trust its stat next time.
        let recent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64 - mtime_ns < 1_000_000_000)
            .unwrap_or(true);
        if !recent {
            self.entries.insert(
                key,
                StatEntry {
                    size: meta.len(),
                    mtime_ns,
                    ino: meta.ino(),
                    digest: digest.clone(),
                },
            );
            self.dirty = true;
        }
        Ok(digest)
    }

    /// Writes the cache back if it changed.
    pub fn save(&mut self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let mut out = String::with_capacity(self.entries.len() * 120);
        for (p, e) in &self.entries {
            let Some(p) = p.to_str().filter(|s| !s.contains('\n')) else {
                continue;
            };
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\n",
                e.size, e.mtime_ns, e.ino, e.digest, p
            ));
        }
        pipe_stages::fsio::write_atomic(path, out.as_bytes())?;
        self.dirty = false;
        Ok(())
    }
}

/// The type of a file by its first bytes (`png`, `svg`, `parquet`, `json`), for outputs
/// whose store objects carry no extension; `None` for anything else.
pub fn sniff_extension(path: &Path) -> Option<&'static str> {
    let mut head = [0u8; 8];
    let n = File::open(path)
        .and_then(|mut f| io::Read::read(&mut f, &mut head))
        .ok()?;
    let head = &head[..n];
    if head.starts_with(b"\x89PNG") {
        Some("png")
    } else if head.starts_with(b"<svg") || head.starts_with(b"<?xml") {
        Some("svg")
    } else if head.starts_with(b"PAR1") {
        Some("parquet")
    } else if matches!(head.first(), Some(b'{') | Some(b'[')) {
        Some("json")
    } else {
        None
    }
}

/// Every file below `dir` with its path relative to `dir` (`/`-separated), sorted.
pub fn files_under(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_digest_is_plain_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a");
        fs::write(&f, b"abc").unwrap();
        assert_eq!(
            hash_file(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn dir_digest_depends_on_names_and_content_only() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for d in [a.path(), b.path()] {
            fs::create_dir_all(d.join("sub")).unwrap();
        }
        fs::write(a.path().join("x"), b"1").unwrap();
        fs::write(a.path().join("sub/y"), b"2").unwrap();
        // Written in the other order.
        fs::write(b.path().join("sub/y"), b"2").unwrap();
        fs::write(b.path().join("x"), b"1").unwrap();
        let (ha, hb) = (
            hash_path(a.path(), None).unwrap(),
            hash_path(b.path(), None).unwrap(),
        );
        assert_eq!(ha, hb);
        assert_eq!(ha.files, 2);
        fs::write(b.path().join("sub/y"), b"3").unwrap();
        assert_ne!(hash_path(b.path(), None).unwrap().digest, ha.digest);
    }
}
