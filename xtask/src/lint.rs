//! The checks of `cargo xtask lint` beyond fmt and clippy: cargo-deny on
//! every dependency (`deny.toml`) and shellcheck on every shell script.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::{cargo, cargo_bin, run, toolchain};

/// Runs cargo-deny: licences, duplicate versions and sources always;
/// advisories when the RustSec database can be fetched (it lives on
/// github.com, which the build machines cannot reach). Returns what the
/// lint summary says about advisories: never a silent pass.
pub fn cargo_deny(root: &Path) -> anyhow::Result<String> {
    toolchain::ensure_cargo_deny()?;
    cargo(
        root,
        &[
            "deny",
            "check",
            "--hide-inclusion-graph",
            "bans",
            "licenses",
            "sources",
        ],
    )?;
    let fetched = Command::new(cargo_bin())
        .current_dir(root)
        .args(["deny", "fetch", "db"])
        .output()
        .context("running cargo deny fetch db")?
        .status
        .success();
    if fetched {
        cargo(
            root,
            &["deny", "check", "--hide-inclusion-graph", "advisories"],
        )?;
        return Ok("advisories ok (database fetched now)".to_owned());
    }
    if advisory_database_present() {
        cargo(
            root,
            &[
                "deny",
                "check",
                "--disable-fetch",
                "--hide-inclusion-graph",
                "advisories",
            ],
        )?;
        return Ok(
            "advisories ok against a database fetched EARLIER (it cannot be refreshed from here)"
                .to_owned(),
        );
    }
    let warning = "advisories NOT CHECKED: the RustSec database (a git repository on \
                   github.com) cannot be fetched from this machine";
    println!("warning: {warning}");
    Ok(warning.to_owned())
}

/// Whether cargo-deny has an advisory database from an earlier fetch.
fn advisory_database_present() -> bool {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    std::fs::read_dir(cargo_home.join("advisory-dbs")).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|entry| entry.path().join("crates").is_dir())
    })
}

/// Runs shellcheck on every shell script of the repository (a `.sh` file,
/// or a file whose first line runs sh or bash). Returns how many.
pub fn shellcheck(root: &Path) -> anyhow::Result<usize> {
    toolchain::ensure_debian_packages(&[("shellcheck", "shellcheck")])?;
    let mut scripts = Vec::new();
    find_shell_scripts(root, &mut scripts)?;
    scripts.sort();
    run(Command::new("shellcheck").current_dir(root).args(&scripts))?;
    Ok(scripts.len())
}

fn find_shell_scripts(dir: &Path, scripts: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') || name == ".ci" {
                find_shell_scripts(&path, scripts)?;
            }
        } else if name.ends_with(".sh") || runs_a_shell(&path) {
            scripts.push(path);
        }
    }
    Ok(())
}

/// Whether the file starts with a `#!` line naming sh or bash.
fn runs_a_shell(path: &Path) -> bool {
    use std::io::Read as _;
    let mut start = [0u8; 128];
    let Ok(read) = std::fs::File::open(path).and_then(|mut f| f.read(&mut start)) else {
        return false;
    };
    let first_line = String::from_utf8_lossy(&start[..read])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    first_line.starts_with("#!")
        && ["sh", "bash"].iter().any(|shell| {
            first_line.ends_with(&format!("/{shell}")) || first_line.ends_with(&format!(" {shell}"))
        })
}
