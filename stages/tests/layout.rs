//! The crate's layering, checked on its sources so that it cannot decay silently:
//! a family of stage kinds (`data`, `label`, `lm`, `eval`, `prefs`) depends on the
//! contract and the shared parts, never on another family; a shared part never
//! depends on a family; and every source file opens with a `//!` paragraph.

use std::path::{Path, PathBuf};

const FAMILIES: &[&str] = &["data", "label", "lm", "eval", "prefs", "heads"];
const SHARED: &[&str] = &[
    "records", "prompt", "model", "oracle", "metrics", "task", "figure", "scalars",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`label/gate.rs` → `label`, `figure.rs` → `figure`).
fn top_module(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The crate-level modules a file names through `crate::NAME`.
fn crate_refs(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(i, m)| {
            text[i + m.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn families_depend_only_on_shared_parts() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let own = top_module(file);
        let text = std::fs::read_to_string(file).unwrap();
        let is_family = FAMILIES.contains(&own.as_str());
        let is_shared = SHARED.contains(&own.as_str());
        for target in crate_refs(&text) {
            let reaches_family = FAMILIES.contains(&target.as_str()) && target != own;
            if (is_family || is_shared) && reaches_family {
                wrong.push(format!("{} names crate::{target}", file.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn every_module_is_a_family_a_shared_part_or_the_contract() {
    let contract = ["lib", "contract", "params", "registry", "fsio", "command"];
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for file in &files {
        let own = top_module(file);
        assert!(
            FAMILIES.contains(&own.as_str())
                || SHARED.contains(&own.as_str())
                || contract.contains(&own.as_str()),
            "{}: `{own}` is neither a family, a shared part nor the contract; add it to one \
             list here and to the crate doc",
            file.display()
        );
    }
}

#[test]
fn every_file_opens_with_a_module_doc() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let engine = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src/pipeline");
    rust_files(&engine, &mut files);
    assert!(files.len() > 40, "found only {} files", files.len());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            text.starts_with("//! "),
            "{} does not open with a `//!` paragraph",
            file.display()
        );
    }
}
