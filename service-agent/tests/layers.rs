//! The agent's folders follow its pipeline, and imports only point down it:
//! `source` → `reconcile` → `datapath`. Beside the pipeline, `ops::metrics`
//! and `ops::health` are fed by it (they may only use `datapath`), while
//! `ops::status`, `ops::list` and `ops::server` read its results. `cli`,
//! `run` and `main` wire everything. This test reads every source file and
//! fails on an import that points up (test modules excluded: they may use
//! the file source to parse fixtures). Under all of them, `error` (the
//! library's `Error` and `Result`, re-exported at the crate root) may be
//! used by every module and uses none; and only the CLI entry (`main`,
//! `cli`) uses `anyhow`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// The layer a module path (`reconcile::sync`, `ops::metrics`, ...) is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    /// `cli`, `run`, `main`, `lib`: wiring, may use everything.
    Wiring,
    /// `ops::status`, `ops::list`, `ops::server`: read the pipeline's results.
    OpsReaders,
    /// `source`.
    Source,
    /// `reconcile`.
    Reconcile,
    /// `ops::metrics`, `ops::health`, `ops::health_check_ports`: fed by the
    /// pipeline.
    OpsFed,
    /// `datapath`.
    Datapath,
    /// `error` (and its `Error` and `Result` at the crate root).
    Errors,
}

fn layer(module: &[&str]) -> Layer {
    match module {
        ["source", ..] => Layer::Source,
        ["reconcile", ..] => Layer::Reconcile,
        ["datapath", ..] => Layer::Datapath,
        ["ops", "metrics" | "health" | "health_check_ports", ..] => Layer::OpsFed,
        ["ops", ..] => Layer::OpsReaders,
        ["error", ..] | ["Error"] | ["Result"] => Layer::Errors,
        _ => Layer::Wiring,
    }
}

/// Whether a module in `from` may use one in `to`.
fn allowed(from: Layer, to: Layer) -> bool {
    use Layer::*;
    if to == Errors {
        return true;
    }
    match from {
        Wiring => true,
        OpsReaders => matches!(to, OpsReaders | Reconcile | OpsFed | Datapath),
        Source => matches!(to, Source | Reconcile | OpsFed | Datapath),
        Reconcile => matches!(to, Reconcile | OpsFed | Datapath),
        OpsFed => matches!(to, OpsFed | Datapath),
        Datapath => to == Datapath,
        Errors => false,
    }
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

/// Every `crate::a::b...` path in `code`, brace groups expanded, as its
/// first two segments.
fn crate_paths(code: &str) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if !preceded_by_ident {
            expand(rest, Vec::new(), &mut out);
        }
    }
    out
}

/// Expands the path starting at `text` (after `prefix`) into `out`.
fn expand(text: &str, prefix: Vec<String>, out: &mut BTreeSet<Vec<String>>) {
    let text = text.trim_start();
    if let Some(group) = text.strip_prefix('{') {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    expand(&group[start..i], prefix.clone(), out);
                    return;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(&group[start..i], prefix.clone(), out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return;
    }
    let ident: String = text
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    // The empty element after a group's trailing comma names nothing.
    if ident.is_empty() && text.trim().is_empty() {
        return;
    }
    if ident.is_empty() || ident == "self" {
        if !prefix.is_empty() {
            out.insert(prefix);
        }
        return;
    }
    let mut path = prefix;
    path.push(ident.clone());
    let after = &text[ident.len()..];
    match after.strip_prefix("::") {
        Some(next) if path.len() < 2 => expand(next, path, out),
        _ => {
            out.insert(path);
        }
    }
}

#[test]
fn imports_only_point_down_the_pipeline() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 10, "found only {files:?}");
    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap().with_extension("");
        let module: Vec<String> = relative
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| s != "mod")
            .collect();
        let from = layer(&module.iter().map(String::as_str).collect::<Vec<_>>());
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        for path in crate_paths(code) {
            let to = layer(&path.iter().map(String::as_str).collect::<Vec<_>>());
            if !allowed(from, to) {
                violations.push(format!(
                    "{} ({from:?}) uses crate::{} ({to:?})",
                    relative.display(),
                    path.join("::")
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports pointing up the pipeline:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_path_reader_sees_grouped_and_inline_paths() {
    let paths = crate_paths(
        "use crate::{datapath::{maps::X, model::Y}, ops::metrics::M};\nlet x = crate::reconcile::sync::f();\nsubcrate::nope::x\nuse crate::{\n    ops::{\n        health::H,\n        metrics::M,\n    },\n};",
    );
    let paths: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        paths,
        [
            "datapath::maps",
            "datapath::model",
            "ops::health",
            "ops::metrics",
            "reconcile::sync"
        ]
    );
    assert!(!allowed(Layer::Datapath, Layer::Reconcile));
    assert!(allowed(Layer::Datapath, Layer::Errors));
    assert!(!allowed(Layer::Errors, Layer::Datapath));
    assert!(!allowed(Layer::Reconcile, Layer::Source));
    assert!(allowed(Layer::Source, Layer::Reconcile));
}

/// The CLI entry's own files: the only ones that may use `anyhow` (it
/// prints the library's error chains); everything below returns the
/// library's `Error`.
const CLI_ENTRY: [&str; 2] = ["main.rs", "cli.rs"];

#[test]
fn only_the_cli_entry_uses_anyhow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut users = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        if CLI_ENTRY.iter().any(|entry| relative == Path::new(entry)) {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap();
        // Test modules included: they return the library's `Result` too.
        if text.contains("anyhow::") || text.contains("anyhow!") || text.contains("use anyhow") {
            users.push(relative.display().to_string());
        }
    }
    assert!(users.is_empty(), "library modules using anyhow: {users:?}");
}
