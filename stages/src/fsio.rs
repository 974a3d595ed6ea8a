//! Crash-safe file writes shared by the engine's store and by stages' checkpoints.
//!
//! A write goes to a temporary file beside the target, is fsynced, renamed over the
//! target, and the directory is fsynced, so a reader sees the old content or the new one,
//! never a mix. A guard deletes the temporary file if the write fails or unwinds.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A unique temporary path beside `target` (same directory, so rename is atomic).
pub fn temp_path_for(target: &Path) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target
        .file_name()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.tmp.{}.{n}", std::process::id()))
}

/// Deletes a path on drop unless disarmed: partial files never outlive a failed write.
pub struct RemoveOnDrop {
    path: Option<PathBuf>,
}

impl RemoveOnDrop {
    /// Guards `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }

    /// Keeps the path (the write succeeded).
    pub fn disarm(mut self) {
        self.path = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if path.is_dir() {
                let _ = fs::remove_dir_all(&path);
            } else {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

/// Atomically replaces `target` with `bytes`.
pub fn write_atomic(target: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = temp_path_for(target);
    let guard = RemoveOnDrop::new(tmp.clone());
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, target)?;
    guard.disarm();
    sync_dir(target.parent().unwrap_or(Path::new(".")))
}

/// Atomically replaces `target` with the JSON form of `value` (pretty, newline-terminated).
pub fn write_json_atomic<T: serde::Serialize>(target: &Path, value: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write_atomic(target, &bytes)
}

/// fsyncs a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    match File::open(dir) {
        Ok(d) => d.sync_all().or_else(|e| {
            // Some filesystems refuse fsync on directories; the rename is still atomic.
            if e.kind() == io::ErrorKind::InvalidInput {
                Ok(())
            } else {
                Err(e)
            }
        }),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b.json");
        write_atomic(&target, b"one").unwrap();
        write_atomic(&target, b"two").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(target.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn guard_removes_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("partial");
        fs::write(&p, b"x").unwrap();
        drop(RemoveOnDrop::new(p.clone()));
        assert!(!p.exists());
    }
}
