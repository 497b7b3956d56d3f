//! Versioned schema migrations, applied when a database is opened, on either engine. The
//! version lives in `meta.schema_version`; each migration runs in the same serialised
//! transaction as the version bump, so processes opening one database at once apply it once.
//! A database from a newer kiln (a version this build does not know) is refused, not altered.

use super::{pg, Db, DbError, DbResult, Engine};

/// The schema version this kiln writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Migration `i` takes a database from version `i` to `i + 1`. Written for SQLite; translated
/// for PostgreSQL by [`pg::pg_schema`].
const MIGRATIONS: &[&str] = &[
    // 1: the library (jobs, assets, step parameters, QC), the queue and API keys. Every
    // statement is IF NOT EXISTS: libraries made before versioned migrations are version 1.
    concat!(
        include_str!("schema/library.sql"),
        include_str!("schema/queue.sql"),
        include_str!("schema/keys.sql")
    ),
    // 2: workers in other processes and on other boxes: leases on running jobs, the workers'
    // heartbeats and what they advertise, events relayed to servers, image bytes for servers
    // that did not write the file.
    include_str!("schema/workers.sql"),
];

const META: &str = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);";

/// What [`apply`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub from: i64,
    pub to: i64,
}

fn schema_for(db: &Db, sql: &str) -> String {
    match db.engine() {
        Engine::Sqlite => sql.to_string(),
        Engine::Postgres => pg::pg_schema(sql),
    }
}

/// Brings the database to [`SCHEMA_VERSION`].
pub fn apply(db: &Db) -> DbResult<Applied> {
    // Inside the serialised transaction: PostgreSQL's CREATE TABLE IF NOT EXISTS is not safe
    // against another process creating the same table at the same moment.
    let meta = schema_for(db, META);
    let tx = db.begin_serialised("kiln-migrate")?;
    tx.execute_batch(&meta)?;
    let found: Option<String> =
        tx.query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[], |r| r.get(0))?;
    let from = match found {
        None => 0,
        Some(v) => v.parse::<i64>().map_err(|_| {
            DbError::Engine(format!("meta.schema_version is `{v}`, not a number: the database was edited"))
        })?,
    };
    if from > SCHEMA_VERSION {
        return Err(DbError::Engine(format!(
            "its schema version is `{from}`, this kiln knows versions up to {SCHEMA_VERSION}: it was written by a \
             newer kiln; run that version (or move a SQLite library aside to start a new one)"
        )));
    }
    for sql in &MIGRATIONS[from as usize..] {
        let sql = schema_for(&tx, sql);
        tx.execute_batch(&sql)?;
    }
    if from < SCHEMA_VERSION {
        let version = SCHEMA_VERSION.to_string();
        if from == 0 {
            tx.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?1)", crate::vals![version])?;
        } else {
            tx.execute("UPDATE meta SET value = ?1 WHERE key = 'schema_version'", crate::vals![version])?;
        }
    }
    tx.commit()?;
    Ok(Applied { from, to: SCHEMA_VERSION })
}
