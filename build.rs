//! Two things for the build. First, `RELAY_GIT_COMMIT`, the commit relay is
//! built from, for `relay --version`: `git rev-parse --short=12 HEAD`, with
//! `-dirty` when `git status --porcelain` lists anything, or `unknown` where
//! git or the checkout is missing (a crate tarball). It is recomputed when
//! HEAD, the branch it points to, the index or a source file changes. A
//! build from a tarball may set `RELAY_GIT_COMMIT` itself.
//!
//! Second, it tells the integration tests whether PostgreSQL can be had for
//! them, so the PostgreSQL variants are compiled as ignored (and reported so
//! by `cargo test`) rather than passing without running where it cannot: the
//! cfg `relay_postgres_tests` is set when `RELAY_TEST_POSTGRES` names a server
//! or PostgreSQL's server binaries are installed (`/usr/lib/postgresql/*/bin`),
//! from which the tests start a throwaway cluster of their own. Nothing in the
//! library or the binary reads that cfg.

use std::path::{Path, PathBuf};
use std::process::Command;

const INSTALL_ROOT: &str = "/usr/lib/postgresql";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    git_commit();
    postgres_tests();
    root_tests();
}

/// The cfg `relay_root_tests`: the build runs as root, so the tests that
/// mount a tmpfs (a full disk) can run; elsewhere they are compiled as
/// ignored, never passed without running.
fn root_tests() {
    println!("cargo::rustc-check-cfg=cfg(relay_root_tests)");
    let uid = Command::new("id").arg("-u").output().ok();
    let root =
        uid.is_some_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "0");
    if root {
        println!("cargo::rustc-cfg=relay_root_tests");
    }
}

/// Runs git in the package's directory; its trimmed stdout when it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let out = Command::new("git").args(args).current_dir(dir).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn git_commit() {
    println!("cargo::rerun-if-env-changed=RELAY_GIT_COMMIT");
    let commit = std::env::var("RELAY_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(commit_of_checkout)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo::rustc-env=RELAY_GIT_COMMIT={commit}");
}

/// The checkout's commit, or None when the package is not the top of a Git
/// work tree (an unpacked crate inside some other repository counts as none).
fn commit_of_checkout() -> Option<String> {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let top = PathBuf::from(git(&["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != manifest.canonicalize().ok()? {
        return None;
    }
    // HEAD, its reflog (written by every commit and checkout, even of a
    // branch that is only in packed-refs), the branch it names, packed-refs
    // and the index live under the Git directory, which a worktree keeps
    // elsewhere.
    for name in ["HEAD", "logs/HEAD", "packed-refs", "index"] {
        watch(git(&["rev-parse", "--git-path", name]));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(git(&["rev-parse", "--git-path", &branch]));
    }
    // An edited file makes the build dirty without touching the index.
    for path in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo::rerun-if-changed={path}");
    }
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = !git(&["status", "--porcelain"])?.is_empty();
    Some(if dirty { format!("{commit}-dirty") } else { commit })
}

/// Reruns the build script when the file at `path` changes. Only a file
/// that exists: Cargo reruns on every build for a missing one, and a folder
/// of the Git directory changes with every git command in any worktree.
/// Relative paths are relative to the package, where both git and this
/// script run.
fn watch(path: Option<String>) {
    if let Some(path) = path.map(PathBuf::from).filter(|p| p.is_file()) {
        println!("cargo::rerun-if-changed={}", path.display());
    }
}

fn postgres_tests() {
    println!("cargo::rustc-check-cfg=cfg(relay_postgres_tests)");
    println!("cargo::rerun-if-env-changed=RELAY_TEST_POSTGRES");
    let root = Path::new(INSTALL_ROOT);
    if root.is_dir() {
        // An install or removal of a server version changes the directory.
        println!("cargo::rerun-if-changed={INSTALL_ROOT}");
    }
    let installed = std::fs::read_dir(root).is_ok_and(|versions| {
        versions.flatten().any(|version| {
            let bin = version.path().join("bin");
            bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()
        })
    });
    if installed || std::env::var_os("RELAY_TEST_POSTGRES").is_some() {
        println!("cargo::rustc-cfg=relay_postgres_tests");
    }
}
