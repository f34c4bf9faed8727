//! What the package ships besides the daemon, read from the built binary:
//! the shell completions and man pages come from the same clap definitions
//! as `--help`, `--version` names the commit and the store schemas, and the
//! packaged config (`packaging/relay.toml`) refuses to run until it is filled
//! in, naming each key to fill.

use std::path::PathBuf;
use std::process::Command;

use crate::support::relay_binary;

/// The subcommands a person types; completions and the man page name each.
const SUBCOMMANDS: [&str; 6] = ["serve", "check", "explain", "send", "jobs", "completions"];

fn relay(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(relay_binary())
        .args(args)
        .env_remove("RELAY_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn have_bash() -> bool {
    Command::new("bash")
        .arg("-c")
        .arg("true")
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn bash_completions_define_a_function_that_offers_every_subcommand() {
    let (code, script, err) = relay(&["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    assert!(script.contains("_relay()"), "no completion function:\n{script}");
    assert!(script.contains("complete -F _relay") || script.contains("-F _relay"));
    for sub in SUBCOMMANDS {
        assert!(script.contains(sub), "completions miss {sub:?}");
    }
    if !have_bash() {
        eprintln!("SKIPPED: bash is not installed; the script was not loaded");
        return;
    }
    // Loaded the way the README says, `complete -p` knows relay.
    let loaded = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source <('{}' completions bash) && complete -p relay",
            relay_binary()
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    assert!(
        stdout.contains("_relay") && stdout.trim_end().ends_with(" relay"),
        "{stdout}"
    );
}

#[test]
fn zsh_and_fish_completions_name_the_subcommands() {
    for shell in ["zsh", "fish"] {
        let (code, script, err) = relay(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        for sub in SUBCOMMANDS {
            assert!(script.contains(sub), "{shell} completions miss {sub:?}");
        }
    }
    let (code, _, err) = relay(&["completions", "tcsh"]);
    assert_eq!(code, 2, "an unknown shell is bad usage");
    assert!(err.contains("tcsh"), "{err}");
}

#[test]
fn the_man_page_is_roff_and_names_every_subcommand() {
    let (code, page, err) = relay(&["man"]);
    assert_eq!(code, 0, "{err}");
    let th = page
        .lines()
        .find(|l| l.starts_with(".TH"))
        .unwrap_or_else(|| panic!("no .TH header:\n{page}"));
    assert!(th.starts_with(".TH RELAY 1"), "{th}");
    // Nothing but roff's preamble (string definitions) comes before it.
    assert!(
        page.lines()
            .take_while(|l| !l.starts_with(".TH"))
            .all(|l| l.starts_with('.'))
    );
    for sub in SUBCOMMANDS {
        assert!(
            page.contains(&format!("relay\\-{sub}(1)")),
            "the page misses {sub:?}"
        );
    }
    assert!(
        !page.contains("relay\\-man"),
        "the hidden generator stays out of the page"
    );

    // The package's pages: relay.1 and one per subcommand.
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = relay(&["man", "--dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let written = std::fs::read_to_string(dir.path().join("relay.1")).unwrap();
    assert_eq!(written, page);
    for name in ["relay-serve.1", "relay-jobs.1", "relay-jobs-retry.1"] {
        let sub = std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert!(sub.contains(".TH RELAY-"), "{name}: {sub}");
    }
}

#[test]
fn version_names_the_commit_and_the_store_schemas() {
    let (code, out, err) = relay(&["--version"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], format!("relay {}", env!("CARGO_PKG_VERSION")));
    let commit = lines[1]
        .strip_prefix("commit: ")
        .unwrap_or_else(|| panic!("{out}"));
    let hash = commit.strip_suffix("-dirty").unwrap_or(commit);
    assert!(
        commit == "unknown" || (hash.len() == 12 && hash.chars().all(|c| c.is_ascii_hexdigit())),
        "commit {commit:?} is neither 12 hex digits (maybe -dirty) nor unknown"
    );
    assert_eq!(
        lines[2],
        format!(
            "store schema: sqlite {}, postgres {}",
            relay::store::SQLITE_SCHEMA_VERSION,
            relay::store::POSTGRES_SCHEMA_VERSION
        )
    );

    let (code, short, _) = relay(&["-V"]);
    assert_eq!(code, 0);
    assert_eq!(
        short.trim_end(),
        format!("relay {} ({commit})", env!("CARGO_PKG_VERSION"))
    );
}

fn packaged_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/relay.toml")
}

#[test]
fn the_packaged_config_names_what_to_fill_in_until_it_is_filled() {
    let config = packaged_config();
    let (code, _, err) = relay(&["check", "-c", config.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    for key in [
        "sources.github.secret: credential \"github-webhook-secret\" needs $CREDENTIALS_DIRECTORY",
        "targets.circleci.project: is required",
        "targets.circleci.token: credential \"circle-token\"",
    ] {
        assert!(err.contains(key), "missing {key:?} in:\n{err}");
    }

    // With the credentials the unit loads and a project, it checks: nothing
    // else is left to fill, and the target is real (no dry run).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("github-webhook-secret"), "a-webhook-secret\n").unwrap();
    std::fs::write(dir.path().join("circle-token"), "a-circleci-token\n").unwrap();
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("# project = "),
        "the sample leaves the project to fill"
    );
    let filled = text.replace("# project = ", "project = ");
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, filled).unwrap();
    let out = Command::new(relay_binary())
        .args(["check", "-c", path.to_str().unwrap()])
        .env_remove("RELAY_CONFIG")
        .env("CREDENTIALS_DIRECTORY", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("store: sqlite:///var/lib/relay/relay.db"),
        "{stdout}"
    );
    assert!(!stdout.contains("dry run"), "{stdout}");
}

#[test]
fn the_unit_runs_the_packaged_binary_on_the_packaged_config() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("systemd/relay.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).unwrap();
    assert!(
        exec.starts_with("/usr/bin/relay serve --config /etc/relay/relay.toml"),
        "{exec}"
    );
    // Every credential the packaged config reads is one the unit loads.
    let config = std::fs::read_to_string(packaged_config()).unwrap();
    for name in ["github-webhook-secret", "circle-token"] {
        assert!(config.contains(&format!("credential = \"{name}\"")));
        assert!(
            unit.contains(&format!("LoadCredential={name}:/etc/relay/credentials/{name}")),
            "the unit does not load {name}"
        );
    }
    assert!(unit.contains("StateDirectory=relay"));
}
