//! Secret references in `relay.toml` and the resolved [`Secret`] they become.
//!
//! A secret's bytes leave this type only through [`Secret::expose`] and
//! [`Secret::candidates`], called by signature checks and outbound auth.
//! `Debug` and `Display` print `[redacted]`; nothing here logs a value.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

/// What stands where a secret would, in anything shown to a person.
pub const REDACTED: &str = "[redacted]";

/// Secrets shorter than this are not searched for in target answers: a value
/// so short would shred ordinary words and hide nothing.
pub const MIN_SCRUBBED_SECRET: usize = 8;

/// How `relay.toml` names a secret. Literals work but are warned about.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a secret: a string, { env = \"NAME\" }, { file = \"PATH\" }, { credential = \"NAME\" }, or a list of these for rotation"
)]
pub enum SecretSpec {
    One(SecretSource),
    Rotation(Vec<SecretSource>),
}

#[derive(Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a secret: a string, { env = \"NAME\" }, { file = \"PATH\" } or { credential = \"NAME\" }"
)]
pub enum SecretSource {
    Literal(String),
    Env(EnvRef),
    File(FileRef),
    Credential(CredentialRef),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvRef {
    env: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialRef {
    credential: String,
}

/// Why a secret reference could not be read. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("environment variable {0} is empty")]
    EnvEmpty(String),
    #[error("cannot read secret file {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret file {} is empty", .0.display())]
    FileEmpty(PathBuf),
    #[error(
        "credential {0:?} needs $CREDENTIALS_DIRECTORY, which systemd sets for units with LoadCredential=; it is not set"
    )]
    NoCredentialsDirectory(String),
    #[error("a secret list for rotation must name at least one secret")]
    EmptyRotation,
}

impl SecretSource {
    /// Where the secret comes from, safe to print (`env GITHUB_WEBHOOK_SECRET`).
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Literal(_) => "literal in config".to_owned(),
            SecretSource::Env(r) => format!("env {}", r.env),
            SecretSource::File(r) => format!("file {}", r.file.display()),
            SecretSource::Credential(r) => format!("credential {}", r.credential),
        }
    }

    fn read(&self) -> Result<Vec<u8>, SecretError> {
        match self {
            SecretSource::Literal(value) => Ok(value.as_bytes().to_vec()),
            SecretSource::Env(r) => match std::env::var_os(&r.env) {
                None => Err(SecretError::EnvMissing(r.env.clone())),
                Some(v) if v.is_empty() => Err(SecretError::EnvEmpty(r.env.clone())),
                Some(v) => Ok(v.into_encoded_bytes()),
            },
            SecretSource::File(r) => read_secret_file(&r.file),
            SecretSource::Credential(r) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| SecretError::NoCredentialsDirectory(r.credential.clone()))?;
                read_secret_file(&Path::new(&dir).join(&r.credential))
            }
        }
    }
}

fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretError> {
    let mut bytes = std::fs::read(path).map_err(|source| SecretError::File {
        path: path.to_owned(),
        source,
    })?;
    // Editors and `echo` add a trailing newline that is never part of the secret.
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(SecretError::FileEmpty(path.to_owned()));
    }
    Ok(bytes)
}

impl SecretSpec {
    pub fn sources(&self) -> &[SecretSource] {
        match self {
            SecretSpec::One(s) => std::slice::from_ref(s),
            SecretSpec::Rotation(list) => list,
        }
    }

    pub fn describe(&self) -> String {
        let parts: Vec<String> = self.sources().iter().map(SecretSource::describe).collect();
        parts.join(", ")
    }

    pub fn has_literal(&self) -> bool {
        self.sources()
            .iter()
            .any(|s| matches!(s, SecretSource::Literal(_)))
    }

    /// Reads every value now; the first is the current one, the rest verify only.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        let sources = self.sources();
        if sources.is_empty() {
            return Err(SecretError::EmptyRotation);
        }
        let values = sources
            .iter()
            .map(|s| s.read().map(Vec::into_boxed_slice))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Secret {
            values: values.into(),
            origin: self.describe().into(),
        })
    }
}

/// A resolved secret: one or more values (rotation), never printed.
#[derive(Clone)]
pub struct Secret {
    values: Arc<[Box<[u8]>]>,
    origin: Arc<str>,
}

impl Secret {
    /// A secret built in code (tests, `relay send --secret-env`).
    pub fn from_bytes(value: impl Into<Vec<u8>>, origin: &str) -> Secret {
        Secret {
            values: vec![value.into().into_boxed_slice()].into(),
            origin: origin.into(),
        }
    }

    /// Adds an older value that still verifies (rotation).
    pub fn with_rotation(self, older: impl Into<Vec<u8>>) -> Secret {
        let mut values: Vec<Box<[u8]>> = self.values.to_vec();
        values.push(older.into().into_boxed_slice());
        Secret {
            values: values.into(),
            origin: self.origin,
        }
    }

    /// The current value: the one used to sign and authenticate outbound.
    pub fn expose(&self) -> &[u8] {
        &self.values[0]
    }

    /// Every value that may verify an incoming request (rotation).
    pub fn candidates(&self) -> impl Iterator<Item = &[u8]> {
        self.values.iter().map(|v| &v[..])
    }

    /// Where it came from, safe to print.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([redacted] from {})", self.origin)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_src: &str) -> SecretSpec {
        #[derive(Deserialize)]
        struct Holder {
            secret: SecretSpec,
        }
        toml::from_str::<Holder>(toml_src).unwrap().secret
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = spec(r#"secret = "hunter2-value""#).resolve().unwrap();
        assert_eq!(secret.expose(), b"hunter2-value");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(format!("{secret}"), "[redacted]");
        let source = spec(r#"secret = "hunter2-value""#);
        assert!(!format!("{source:?}").contains("hunter2"));
    }

    #[test]
    fn file_secret_strips_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "abc\n").unwrap();
        let s = spec(&format!("secret = {{ file = {:?} }}", path.display().to_string()));
        assert_eq!(s.resolve().unwrap().expose(), b"abc");
    }

    #[test]
    fn rotation_keeps_order_and_exposes_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old");
        std::fs::write(&path, "old-value").unwrap();
        let s = spec(&format!(
            "secret = [\"new-value\", {{ file = {:?} }}]",
            path.display().to_string()
        ));
        let secret = s.resolve().unwrap();
        assert_eq!(secret.expose(), b"new-value");
        let all: Vec<&[u8]> = secret.candidates().collect();
        assert_eq!(all, vec![&b"new-value"[..], &b"old-value"[..]]);
    }

    #[test]
    fn missing_env_names_the_variable() {
        let err = spec(r#"secret = { env = "RELAY_TEST_SURELY_UNSET_VAR" }"#)
            .resolve()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable RELAY_TEST_SURELY_UNSET_VAR is not set"
        );
    }

    #[test]
    fn unknown_shape_is_rejected_with_the_accepted_forms() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Holder {
            secret: SecretSpec,
        }
        let err = toml::from_str::<Holder>(r#"secret = { vault = "x" }"#).unwrap_err();
        assert!(err.to_string().contains("{ env = \"NAME\" }"), "{err}");
    }
}
