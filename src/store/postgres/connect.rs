//! Reaching PostgreSQL: the connection settings a daemon needs where the
//! URL leaves them open, TLS (always verifying the server), the pool's
//! errors in words a person can act on, and the deadlines every store
//! operation runs within.
//!
//! What this module must never do: put the database password into an error
//! or a log line (tokio-postgres's messages never carry it; only the masked
//! URL is ever printed), or skip the server certificate's check.

use std::error::Error as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{PoolError, TimeoutType};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::warn;

use crate::config::PostgresSettings;
use crate::store::StoreError;

/// Wait for a pooled connection, or for a new one to be made, before the
/// store reports itself unavailable (ingress answers 503, the sender retries).
pub(super) const POOL_TIMEOUT: Duration = Duration::from_secs(5);

/// Unacknowledged data on a connection for this long ends it.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle connection is probed after this long (then every third of it).
const KEEPALIVES_IDLE: Duration = Duration::from_secs(15);
/// tokio-postgres's (and libpq's) default idle time, which a URL that sets
/// none leaves in place.
const LIBPQ_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// The longest an operation on the delivery path (claims, completions,
/// renewals, readiness, payload URLs; ingest is bounded by its caller) may take before it is
/// reported unavailable (ingress answers 503, the sender retries). A
/// database that stopped answering without closing its connections (a host
/// gone, a network partition) would otherwise hold each webhook until its
/// sender gave up. Below GitHub's and GitLab's 10-second delivery timeout.
pub(super) const OPERATION_TIMEOUT: Duration = Duration::from_secs(8);

/// The same for what a person asks through the admin API or the CLI, which
/// may touch many rows (a retry of every dead job of a target) and has no
/// sender waiting on it.
pub(super) const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one store operation, giving up after `limit`. (A statement the
/// database is still running then may yet complete: every operation here is
/// one that can be asked again.)
pub(super) async fn within<T>(
    what: &str,
    limit: Duration,
    operation: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, operation).await.unwrap_or_else(|_| {
        Err(StoreError::Unavailable(format!(
            "the database did not answer within {}s ({what})",
            limit.as_secs()
        )))
    })
}

/// The URL's connection settings, with what a long-running daemon needs
/// where the URL leaves it open: a connect timeout, and TCP keepalives and a
/// user timeout, so that a connection to a database that vanished without a
/// word (a host gone, a dropped NAT entry) fails in seconds instead of
/// hanging until the kernel's two-hour default.
pub(super) fn connection_config(connect: &tokio_postgres::Config) -> tokio_postgres::Config {
    let mut connect = connect.clone();
    if connect.get_connect_timeout().is_none() {
        connect.connect_timeout(POOL_TIMEOUT);
    }
    if connect.get_tcp_user_timeout().is_none() {
        connect.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if connect.get_keepalives_idle() == LIBPQ_KEEPALIVES_IDLE {
        connect
            .keepalives(true)
            .keepalives_idle(KEEPALIVES_IDLE)
            .keepalives_interval(KEEPALIVES_IDLE / 3)
            .keepalives_retries(3);
    }
    connect
}

/// One TLS setup for every connection: the CA file's certificates when one
/// is configured, else the platform's roots (read only when TLS can be used).
pub(super) fn tls_connector(settings: &PostgresSettings) -> Result<MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    if settings.connect.get_ssl_mode() != SslMode::Disable {
        match &settings.ca_file {
            Some(path) => {
                let unreadable = |e: rustls::pki_types::pem::Error| {
                    format!("cannot read CA certificates from {}: {e}", path.display())
                };
                for cert in CertificateDer::pem_file_iter(path).map_err(unreadable)? {
                    roots
                        .add(cert.map_err(unreadable)?)
                        .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("{} holds no PEM certificate", path.display()));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    warn!(
                        errors = ?found.errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "no system CA certificates found: a TLS connection to PostgreSQL will fail; set store.ca_file"
                    );
                }
            }
        }
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A tokio-postgres error with its cause: the error's own text is only its
/// kind ("db error"); the server's message is the source.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub(super) fn pool_error(e: &PoolError) -> String {
    let waited = POOL_TIMEOUT.as_secs();
    match e {
        PoolError::Backend(e) => connect_error(e),
        PoolError::Timeout(TimeoutType::Wait) => {
            format!("every pooled database connection stayed busy for {waited}s (store.pool_size)")
        }
        PoolError::Timeout(_) => format!("PostgreSQL did not accept a connection within {waited}s"),
        other => other.to_string(),
    }
}

/// Why a connection could not be made, with a hint where the usual fix is
/// not obvious from the server's words.
pub(super) fn connect_error(e: &tokio_postgres::Error) -> String {
    let text = describe(e);
    if text.starts_with("error performing TLS handshake") {
        // libpq's sslmode=prefer/require do not check the certificate;
        // relay always does.
        format!(
            "{text} (relay verifies the server's certificate: set store.ca_file to the CA that signed it, \
             or add sslmode=disable to store.url on a trusted network)"
        )
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL that says nothing of timeouts gets a daemon's: a dead peer is
    /// noticed in seconds, not after the kernel's two hours.
    #[test]
    fn connections_get_keepalives_and_a_user_timeout_unless_the_url_sets_them() {
        let plain: tokio_postgres::Config = "postgres://relay@db/relay".parse().unwrap();
        let hardened = connection_config(&plain);
        assert_eq!(hardened.get_connect_timeout(), Some(&POOL_TIMEOUT));
        assert_eq!(hardened.get_tcp_user_timeout(), Some(&Duration::from_secs(10)));
        assert!(hardened.get_keepalives());
        assert_eq!(hardened.get_keepalives_idle(), Duration::from_secs(15));
        assert_eq!(hardened.get_keepalives_interval(), Some(Duration::from_secs(5)));
        assert_eq!(hardened.get_keepalives_retries(), Some(3));

        let own: tokio_postgres::Config =
            "postgres://relay@db/relay?connect_timeout=2&tcp_user_timeout=30&keepalives_idle=60"
                .parse()
                .unwrap();
        let kept = connection_config(&own);
        assert_eq!(kept.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(kept.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));
        assert_eq!(kept.get_keepalives_idle(), Duration::from_secs(60));
    }
}
