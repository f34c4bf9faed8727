//! The dedicated LISTEN connection: hears `NOTIFY relay_jobs` from every
//! relay on the database and wakes this relay's dispatcher; keeps itself
//! alive with a heartbeat and reconnects, with backoff, when it drops.
//!
//! What this module must never do: use a pooled connection (its
//! notifications would be lost to other work), or let a missed signal cost
//! more than latency: the dispatcher also polls, and every reconnect wakes
//! it to look for itself.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, info, warn};

use super::connect::{connect_error, describe};

/// How often an idle LISTEN connection is checked: a connection that died
/// silently (a dropped NAT entry) would otherwise never be replaced.
const HEARTBEAT: Duration = Duration::from_secs(30);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The listener's connection type: tokio-postgres skips TLS itself when
/// `sslmode=disable`.
pub(super) type PgConnection = Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Opens the dedicated LISTEN connection (never a pooled one: a pooled
/// connection would be handed to other work and its notifications lost).
pub(super) async fn listen_on(
    connect: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
    wake: &Notify,
) -> Result<(Client, PgConnection), String> {
    let (client, mut connection) = connect
        .connect(tls.clone())
        .await
        .map_err(|e| connect_error(&e))?;
    drive(&mut connection, wake, client.batch_execute("LISTEN relay_jobs"))
        .await?
        .map_err(|e| describe(&e))?;
    Ok((client, connection))
}

/// Runs `work` while reading the connection, which is what makes a query's
/// answer (and any notification) arrive. Ends early, with the reason, if
/// the connection does.
async fn drive<F: Future>(
    connection: &mut PgConnection,
    wake: &Notify,
    work: F,
) -> Result<F::Output, String> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(describe(&e)),
                None => return Err("the server closed the connection".to_owned()),
            },
        }
    }
}

/// Listens for as long as the store lives, reconnecting when the connection
/// drops. A missed signal costs latency only (the dispatcher also polls), so
/// after every reconnect the dispatcher is woken to look for itself.
pub(super) async fn keep_listening(
    first: (Client, PgConnection),
    connect: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    wake: Arc<Notify>,
    shown: String,
) {
    let mut session = first;
    loop {
        let (client, mut connection) = session;
        let heartbeat = async {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.batch_execute("SELECT 1")).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return describe(&e),
                    Err(_) => return "the connection stopped answering".to_owned(),
                }
            }
        };
        let lost = match drive(&mut connection, &wake, heartbeat).await {
            Ok(reason) | Err(reason) => reason,
        };
        drop(client);
        warn!(
            store = %shown,
            error = %lost,
            "lost the PostgreSQL LISTEN connection; reconnecting (work from other relays is found by polling meanwhile)"
        );
        let mut delay = BACKOFF_FIRST;
        let mut failures = 0u32;
        session = loop {
            tokio::time::sleep(delay).await;
            match listen_on(&connect, &tls, &wake).await {
                Ok(session) => break session,
                Err(e) => {
                    failures += 1;
                    debug!(store = %shown, error = %e, "cannot reconnect the LISTEN connection yet");
                    delay = (delay * 2).min(BACKOFF_MAX);
                }
            }
        };
        info!(store = %shown, failures, "PostgreSQL LISTEN connection restored");
        wake.notify_one();
    }
}
