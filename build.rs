//! Tells the integration tests whether PostgreSQL can be had for them, so the
//! PostgreSQL variants are compiled as ignored (and reported so by `cargo
//! test`) rather than passing without running where it cannot: the cfg
//! `relay_postgres_tests` is set when `RELAY_TEST_POSTGRES` names a server or
//! PostgreSQL's server binaries are installed (`/usr/lib/postgresql/*/bin`),
//! from which the tests start a throwaway cluster of their own. Nothing in the
//! library or the binary reads it.

use std::path::Path;

const INSTALL_ROOT: &str = "/usr/lib/postgresql";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(relay_postgres_tests)");
    println!("cargo::rerun-if-changed=build.rs");
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
