//! The SQLite side of [`super::Db`]: rusqlite, values converted both ways.

use super::{DbError, DbResult, Row, Value};
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::Connection;

pub(super) fn error(e: rusqlite::Error) -> DbError {
    match e {
        rusqlite::Error::IntegralValueOutOfRange(column, value) => DbError::OutOfRange { column, value },
        rusqlite::Error::InvalidColumnType(column, _, kind) => DbError::WrongType {
            column,
            expected: "another type",
            found: match kind {
                rusqlite::types::Type::Null => "null",
                rusqlite::types::Type::Integer => "integer",
                rusqlite::types::Type::Real => "real",
                rusqlite::types::Type::Text => "text",
                rusqlite::types::Type::Blob => "blob",
            },
        },
        other => DbError::Engine(other.to_string()),
    }
}

fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Real(r) => SqlValue::Real(*r),
        Value::Text(s) => SqlValue::Text(s.clone()),
        Value::Blob(b) => SqlValue::Blob(b.clone()),
    }
}

fn from_sql(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

pub(super) fn execute(c: &Connection, sql: &str, params: &[Value]) -> DbResult<u64> {
    let mut stmt = c.prepare_cached(sql).map_err(error)?;
    // A statement that returns rows (a SELECT for its side effect) is stepped through them.
    if stmt.column_count() > 0 {
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(to_sql))).map_err(error)?;
        while rows.next().map_err(error)?.is_some() {}
        return Ok(0);
    }
    stmt.execute(rusqlite::params_from_iter(params.iter().map(to_sql))).map(|n| n as u64).map_err(error)
}

pub(super) fn query(c: &Connection, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
    let mut stmt = c.prepare_cached(sql).map_err(error)?;
    let n = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params.iter().map(to_sql))).map_err(error)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(error)? {
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            values.push(from_sql(r.get_ref(i).map_err(error)?));
        }
        out.push(Row(values));
    }
    Ok(out)
}
