//! The PostgreSQL schema brought up to date: its migrations (`migrations`)
//! applied under an advisory lock so that relays starting at once migrate
//! once, and the read-only look at a database's version for `relay check`.
//!
//! What this module must never do: edit a released migration (add one),
//! migrate outside the one transaction that holds the lock, or touch
//! relay's rows (it reads and writes `relay_schema` alone).

use deadpool_postgres::Object;
use tokio_postgres::Client;
use tracing::info;

use super::connect::{connect_error, connection_config, describe, tls_connector};
use super::migrations::MIGRATIONS;
use crate::config::PostgresSettings;
use crate::store::{SchemaStatus, StoreError};

/// The advisory lock that serialises migrations between relays starting at
/// once ("relay" in ASCII). Single-key locks live apart from the two-key
/// ones below, so the two never collide.
const MIGRATION_LOCK: i64 = 0x72_656c_6179;

/// The schema version without migrating: one connection, one read, and no
/// lock a running relay (or a migration in progress) holds.
pub(crate) async fn schema_status(settings: &PostgresSettings) -> Result<SchemaStatus, StoreError> {
    let fail = |reason: String| StoreError::Connect {
        url: settings.shown.clone(),
        reason,
    };
    let tls = tls_connector(settings).map_err(fail)?;
    let (client, connection) = connection_config(&settings.connect)
        .connect(tls)
        .await
        .map_err(|e| fail(connect_error(&e)))?;
    let driver = tokio::spawn(connection);
    let version = read_version(&client).await.map_err(|e| fail(describe(&e)));
    drop(client);
    // The connection ends once the client is gone; nothing is left behind.
    let _ = driver.await;
    Ok(SchemaStatus {
        version: version?,
        latest: latest_version(),
    })
}

async fn read_version(client: &Client) -> Result<u32, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('relay_schema') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(0);
    }
    let version: Option<i32> = client
        .query_one("SELECT max(version) FROM relay_schema", &[])
        .await?
        .try_get(0)?;
    Ok(version.and_then(|v| u32::try_from(v).ok()).unwrap_or(0))
}

fn latest_version() -> u32 {
    u32::try_from(MIGRATIONS.len()).unwrap_or(u32::MAX)
}

/// Applies what this build knows and the database lacks, in one
/// transaction under an advisory lock: a relay starting at the same moment
/// waits, then finds the work done.
pub(super) async fn migrate(client: &mut Object) -> Result<(), String> {
    let tx = client.transaction().await.map_err(|e| describe(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| describe(&e))?;
    // "Already exists, skipping" is the normal case, not news.
    tx.batch_execute(
        "SET LOCAL client_min_messages = warning;
         CREATE TABLE IF NOT EXISTS relay_schema (version integer NOT NULL);
         INSERT INTO relay_schema (version) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM relay_schema);",
    )
    .await
    .map_err(|e| describe(&e))?;
    let version: i32 = tx
        .query_one("SELECT max(version) FROM relay_schema", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| describe(&e))?;
    let known = MIGRATIONS.len();
    let version = usize::try_from(version).unwrap_or(0);
    if version > known {
        return Err(format!(
            "the database has schema version {version}, newer than this relay's {known}; run a newer relay"
        ));
    }
    if version == known {
        return Ok(());
    }
    for migration in &MIGRATIONS[version..] {
        tx.batch_execute(migration).await.map_err(|e| describe(&e))?;
    }
    let latest = i32::try_from(known).unwrap_or(i32::MAX);
    tx.execute("UPDATE relay_schema SET version = $1", &[&latest])
        .await
        .map_err(|e| describe(&e))?;
    tx.commit().await.map_err(|e| describe(&e))?;
    info!(from = version, to = known, "store schema brought up to date");
    Ok(())
}
