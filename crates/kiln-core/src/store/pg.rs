//! The PostgreSQL side of [`super::Db`]: the sync `postgres` client behind an r2d2 pool per
//! database URL (a server opens the library per request; a pooled connection costs no TCP and
//! authentication round trips), `?N` placeholders rewritten to `$N`, values converted by the
//! column types PostgreSQL reports, and the schema's SQLite column types translated.
//!
//! Connections are plain TCP or unix sockets (`NoTls`): the database is meant to sit on the
//! studio's own network or the same host; put it behind a TLS tunnel when it does not.

use super::{DbError, DbResult, Row, Value};
use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type};
use postgres::NoTls;
use r2d2_postgres::{r2d2, PostgresConnectionManager};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

type Manager = PostgresConnectionManager<NoTls>;

/// A connection checked out of the pool; back in the pool when dropped.
///
/// The sync client drives its socket with a runtime of its own, which tokio forbids inside
/// another runtime's thread (the server's async handlers open the library too). So every use
/// that may block runs off such threads ([`off_runtime`]), dropping included: a broken
/// connection is closed, not pooled, and closing blocks.
pub struct Pooled(Option<r2d2::PooledConnection<Manager>>);

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                std::thread::spawn(move || drop(conn));
            }
        }
    }
}

/// Runs `f` here, or on a helper thread when this thread drives an async runtime.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| s.spawn(f).join()).unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn client(c: &mut Pooled) -> DbResult<&mut postgres::Client> {
    c.0.as_deref_mut().ok_or_else(|| DbError::Engine("the connection was closed".into()))
}

/// Connections each process keeps open to one database at most.
const POOL_SIZE: u32 = 16;
/// How long an open waits for a connection (an unreachable database fails after this).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn pools() -> &'static Mutex<HashMap<String, r2d2::Pool<Manager>>> {
    static POOLS: OnceLock<Mutex<HashMap<String, r2d2::Pool<Manager>>>> = OnceLock::new();
    POOLS.get_or_init(Default::default)
}

/// A connection to `url` from this process's pool for it.
pub fn connect(url: &str) -> DbResult<Pooled> {
    let pool = {
        let mut pools = pools().lock().unwrap_or_else(|p| p.into_inner());
        match pools.get(url) {
            Some(p) => p.clone(),
            None => {
                let mut config: postgres::Config = url.parse().map_err(|e| {
                    DbError::Engine(format!("`{}` is not a PostgreSQL URL: {e}", super::redact_url(url)))
                })?;
                config.connect_timeout(CONNECT_TIMEOUT);
                config.application_name("kiln");
                let pool = r2d2::Pool::builder()
                    .max_size(POOL_SIZE)
                    .min_idle(Some(0))
                    .connection_timeout(CONNECT_TIMEOUT)
                    .build_unchecked(PostgresConnectionManager::new(config, NoTls));
                pools.insert(url.to_string(), pool.clone());
                pool
            }
        }
    };
    off_runtime(|| pool.get()).map(|c| Pooled(Some(c))).map_err(|e| {
        DbError::Engine(format!(
            "cannot connect to {}: {e} (is the server running, and the URL's user, password and database right?)",
            super::redact_url(url)
        ))
    })
}

/// The connection in a [`super::Db`]'s cell, for one statement.
pub(super) fn borrow(c: &std::cell::RefCell<Pooled>) -> DbResult<std::cell::RefMut<'_, Pooled>> {
    c.try_borrow_mut().map_err(|_| DbError::Engine("the connection is busy with another statement".into()))
}

/// `?N` placeholders (SQLite's numbered form, which the statements use) as `$N`; quoted text
/// is left alone.
pub fn placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted && chars.peek().is_some_and(|d| d.is_ascii_digit()) => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

/// A schema written for SQLite in PostgreSQL's types: `id INTEGER PRIMARY KEY` becomes an
/// identity column, INTEGER BIGINT (kiln's ids and sizes are i64), REAL DOUBLE PRECISION
/// (PostgreSQL's REAL is 4 bytes), BLOB BYTEA.
pub fn pg_schema(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(match word.as_str() {
            "INTEGER" => "BIGINT",
            "REAL" => "DOUBLE PRECISION",
            "BLOB" => "BYTEA",
            w => w,
        });
        word.clear();
    };
    for c in sql
        .replace("id INTEGER PRIMARY KEY", "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
        .chars()
    {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn error(e: postgres::Error) -> DbError {
    match e.as_db_error() {
        Some(db) => DbError::Engine(format!("{}: {}", db.severity(), db.message())),
        None => DbError::Engine(e.to_string()),
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match (self, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Int(i), &Type::INT4) => i32::try_from(*i)?.to_sql(ty, out),
            (Value::Int(i), &Type::INT2) => i16::try_from(*i)?.to_sql(ty, out),
            (Value::Int(i), &Type::FLOAT8) => (*i as f64).to_sql(ty, out),
            (Value::Int(i), &Type::BOOL) => (*i != 0).to_sql(ty, out),
            (Value::Int(i), _) => i.to_sql(ty, out),
            (Value::Real(r), &Type::FLOAT4) => (*r as f32).to_sql(ty, out),
            (Value::Real(r), _) => r.to_sql(ty, out),
            (Value::Text(s), _) => s.as_str().to_sql(ty, out),
            (Value::Blob(b), _) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value in to_sql: a mismatch is an error there, naming both types.
        true
    }

    postgres::types::to_sql_checked!();
}

fn params(values: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

fn column(row: &postgres::Row, i: usize) -> DbResult<Value> {
    let ty = row.columns()[i].type_();
    let get_err = |e: postgres::Error| DbError::Engine(format!("column {i}: {e}"));
    Ok(match *ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(i).map_err(get_err)?.map_or(Value::Null, Value::Int),
        Type::INT4 => {
            row.try_get::<_, Option<i32>>(i).map_err(get_err)?.map_or(Value::Null, |v| Value::Int(v.into()))
        }
        Type::INT2 => {
            row.try_get::<_, Option<i16>>(i).map_err(get_err)?.map_or(Value::Null, |v| Value::Int(v.into()))
        }
        Type::BOOL => {
            row.try_get::<_, Option<bool>>(i).map_err(get_err)?.map_or(Value::Null, |v| Value::Int(v.into()))
        }
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i).map_err(get_err)?.map_or(Value::Null, Value::Real),
        Type::FLOAT4 => {
            row.try_get::<_, Option<f32>>(i).map_err(get_err)?.map_or(Value::Null, |v| Value::Real(v.into()))
        }
        Type::BYTEA => {
            row.try_get::<_, Option<Vec<u8>>>(i).map_err(get_err)?.map_or(Value::Null, Value::Blob)
        }
        Type::VOID => Value::Null,
        _ => row.try_get::<_, Option<String>>(i).map_err(get_err)?.map_or(Value::Null, Value::Text),
    })
}

pub(super) fn execute(c: &mut Pooled, sql: &str, values: &[Value]) -> DbResult<u64> {
    let c = client(c)?;
    off_runtime(|| c.execute(placeholders(sql).as_str(), &params(values)).map_err(error))
}

pub(super) fn execute_batch(c: &mut Pooled, sql: &str) -> DbResult<()> {
    let c = client(c)?;
    off_runtime(|| c.batch_execute(sql).map_err(error))
}

pub(super) fn query(c: &mut Pooled, sql: &str, values: &[Value]) -> DbResult<Vec<Row>> {
    let c = client(c)?;
    off_runtime(|| {
        let rows = c.query(placeholders(sql).as_str(), &params(values)).map_err(error)?;
        rows.iter()
            .map(|r| (0..r.len()).map(|i| column(r, i)).collect::<DbResult<Vec<_>>>().map(Row))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_translate() {
        assert_eq!(
            placeholders("SELECT '?1', x FROM t WHERE a = ?1 AND b = ?12"),
            "SELECT '?1', x FROM t WHERE a = $1 AND b = $12"
        );
        let schema = pg_schema(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, r REAL, b BLOB, realm TEXT);",
        );
        assert_eq!(
            schema,
            "CREATE TABLE t (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT NOT NULL, \
             r DOUBLE PRECISION, b BYTEA, realm TEXT);"
        );
    }
}
