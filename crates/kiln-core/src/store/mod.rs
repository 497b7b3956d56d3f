//! The database under the library, the queue and the ledger: embedded SQLite (one box, the
//! default) or PostgreSQL (`--database postgres://…` / `KILN_DATABASE_URL`, shared by every
//! server and worker). Callers write each statement once, in the SQL both engines accept, with
//! `?N` placeholders; the PostgreSQL side rewrites them to `$N` and the schema's SQLite column
//! types to PostgreSQL's ([`pg::pg_schema`]). Where the dialects really differ (JSON
//! paths, write serialisation, row locks) [`Db`] offers a method instead of raw SQL.
//!
//! - `sqlite`: the rusqlite connection;
//! - `pg`: the pooled postgres connection (r2d2), schema translation;
//! - `migrate`: versioned schema migrations, applied on open on either engine.

pub mod migrate;
pub mod pg;
mod sqlite;

use std::fmt;

/// A value bound to a statement or read from a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// A Rust value a statement can bind (by reference, as rusqlite's `params!` takes them).
pub trait ToValue {
    fn to_value(&self) -> Value;
}

macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value { Value::Int(*self as i64) }
        }
    )*};
}
int_to_value!(i64, i32, u32, u16, u8);

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl ToValue for f32 {
    fn to_value(&self) -> Value {
        Value::Real(f64::from(*self))
    }
}
impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

/// Statement parameters: `vals![a, b, c]`.
#[macro_export]
macro_rules! vals {
    () => { &[] as &[$crate::store::Value] };
    ($($v:expr),+ $(,)?) => { &[$($crate::store::ToValue::to_value(&$v)),+][..] };
}

/// A database error, with the cases kiln explains specially.
#[derive(Debug, Clone, PartialEq)]
pub enum DbError {
    /// A column holds a number kiln never writes (negative size, seed): the file was edited.
    OutOfRange { column: usize, value: i64 },
    /// A column holds another type than kiln writes.
    WrongType { column: usize, expected: &'static str, found: &'static str },
    /// Everything else, as the engine said it.
    Engine(String),
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::OutOfRange { column, value } => write!(f, "column {column} holds {value}, out of range"),
            DbError::WrongType { column, expected, found } => {
                write!(f, "column {column} holds a {found} value where {expected} was expected")
            }
            DbError::Engine(msg) => f.write_str(msg),
        }
    }
}

pub type DbResult<T> = std::result::Result<T, DbError>;

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Value>);

/// A column type a row can be read as.
pub trait FromValue: Sized {
    fn from_value(v: &Value, column: usize) -> DbResult<Self>;
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Int(_) => "integer",
        Value::Real(_) => "real",
        Value::Text(_) => "text",
        Value::Blob(_) => "blob",
    }
}

fn wrong(v: &Value, column: usize, expected: &'static str) -> DbError {
    DbError::WrongType { column, expected, found: kind(v) }
}

impl FromValue for i64 {
    fn from_value(v: &Value, column: usize) -> DbResult<Self> {
        match v {
            Value::Int(i) => Ok(*i),
            _ => Err(wrong(v, column, "integer")),
        }
    }
}
impl FromValue for u32 {
    fn from_value(v: &Value, column: usize) -> DbResult<Self> {
        let i = i64::from_value(v, column)?;
        u32::try_from(i).map_err(|_| DbError::OutOfRange { column, value: i })
    }
}
impl FromValue for u64 {
    fn from_value(v: &Value, column: usize) -> DbResult<Self> {
        let i = i64::from_value(v, column)?;
        u64::try_from(i).map_err(|_| DbError::OutOfRange { column, value: i })
    }
}
impl FromValue for bool {
    fn from_value(v: &Value, column: usize) -> DbResult<Self> {
        Ok(i64::from_value(v, column)? != 0)
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value, column: usize) -> DbResult<Self> {
        match v {
            Value::Real(r) => Ok(*r),
            // SQLite stores a whole REAL as an integer when the column has no affinity.
            Value::Int(i) => Ok(*i as f64),
            _ => Err(wrong(v, column, "real")),
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value, column: usize) -> DbResult<Self> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            _ => Err(wrong(v, column, "text")),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value, column: usize) -> DbResult<Self> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            _ => Err(wrong(v, column, "blob")),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value, column: usize) -> DbResult<Self> {
        match v {
            Value::Null => Ok(None),
            other => T::from_value(other, column).map(Some),
        }
    }
}

impl Row {
    /// Column `i` as `T`.
    pub fn get<T: FromValue>(&self, i: usize) -> DbResult<T> {
        let v = self.0.get(i).ok_or_else(|| DbError::Engine(format!("no column {i} in the result")))?;
        T::from_value(v, i)
    }
}

/// Which engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// An open connection to either engine.
pub enum Db {
    Sqlite(rusqlite::Connection),
    /// In a cell: the postgres client needs `&mut` per statement, while the library reads
    /// through `&self` (rusqlite's connections do); each statement borrows it alone.
    /// Boxed: a pooled client is much larger than a SQLite handle.
    Postgres(Box<std::cell::RefCell<pg::Pooled>>),
}

impl Db {
    pub fn engine(&self) -> Engine {
        match self {
            Db::Sqlite(_) => Engine::Sqlite,
            Db::Postgres(_) => Engine::Postgres,
        }
    }

    /// Runs one statement; the number of rows it changed.
    pub fn execute(&self, sql: &str, params: &[Value]) -> DbResult<u64> {
        match self {
            Db::Sqlite(c) => sqlite::execute(c, sql, params),
            Db::Postgres(c) => pg::execute(&mut *pg::borrow(c)?, sql, params),
        }
    }

    /// Runs several statements without parameters (schema, transaction control).
    pub fn execute_batch(&self, sql: &str) -> DbResult<()> {
        match self {
            Db::Sqlite(c) => c.execute_batch(sql).map_err(sqlite::error),
            Db::Postgres(c) => pg::execute_batch(&mut *pg::borrow(c)?, sql),
        }
    }

    /// Every row of a query.
    pub fn query(&self, sql: &str, params: &[Value]) -> DbResult<Vec<Row>> {
        match self {
            Db::Sqlite(c) => sqlite::query(c, sql, params),
            Db::Postgres(c) => pg::query(&mut *pg::borrow(c)?, sql, params),
        }
    }

    /// Rows of a query, each mapped by `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: &[Value],
        f: impl FnMut(&Row) -> DbResult<T>,
    ) -> DbResult<Vec<T>> {
        self.query(sql, params)?.iter().map(f).collect()
    }

    /// The first row of a query, if any, mapped by `f`.
    pub fn query_opt<T>(
        &self,
        sql: &str,
        params: &[Value],
        f: impl FnOnce(&Row) -> DbResult<T>,
    ) -> DbResult<Option<T>> {
        self.query(sql, params)?.first().map(f).transpose()
    }

    /// The first row of a query, which must exist.
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: &[Value],
        f: impl FnOnce(&Row) -> DbResult<T>,
    ) -> DbResult<T> {
        self.query_opt(sql, params, f)?.ok_or_else(|| DbError::Engine("the query returned no rows".into()))
    }

    /// Runs an `INSERT … RETURNING id` and gives the new row's id.
    pub fn insert_id(&self, sql: &str, params: &[Value]) -> DbResult<i64> {
        self.query_row(sql, params, |r| r.get(0))
    }

    /// Starts a transaction that writes: SQLite takes the write lock at once (`BEGIN
    /// IMMEDIATE`), so a read-then-write (a budget check, a claim) cannot interleave with
    /// another writer's; PostgreSQL also serialises such transactions with an advisory lock
    /// on `topic` (held until commit), as its row locks alone would not stop two budget
    /// checks from both passing.
    pub fn begin_serialised(&self, topic: &str) -> DbResult<Tx<'_>> {
        match self {
            Db::Sqlite(c) => c.execute_batch("BEGIN IMMEDIATE").map_err(sqlite::error)?,
            Db::Postgres(c) => {
                pg::execute_batch(&mut *pg::borrow(c)?, "BEGIN")?;
                let tx = Tx { db: self, open: true };
                tx.execute("SELECT pg_advisory_xact_lock(hashtext(?1))", vals![topic])?;
                return Ok(tx);
            }
        }
        Ok(Tx { db: self, open: true })
    }

    /// Starts a plain transaction (atomicity without serialising against other writers).
    pub fn begin(&self) -> DbResult<Tx<'_>> {
        match self {
            Db::Sqlite(c) => c.execute_batch("BEGIN").map_err(sqlite::error)?,
            Db::Postgres(c) => pg::execute_batch(&mut *pg::borrow(c)?, "BEGIN")?,
        }
        Ok(Tx { db: self, open: true })
    }

    /// An expression reading the text at `path` (object keys) of the JSON text in `column`.
    pub fn json_text(&self, column: &str, path: &[&str]) -> String {
        match self {
            Db::Sqlite(_) => format!("json_extract({column}, '$.{}')", path.join(".")),
            Db::Postgres(_) => format!("(CAST({column} AS JSONB) #>> '{{{}}}')", path.join(",")),
        }
    }

    /// An expression for the database server's clock, in Unix seconds. Leases and heartbeats
    /// are stamped and checked with it, so workers on boxes whose clocks disagree still agree
    /// on when a lease ran out.
    pub fn now_sql(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "((julianday('now') - 2440587.5) * 86400.0)",
            Db::Postgres(_) => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)",
        }
    }

    /// ` FOR UPDATE SKIP LOCKED` where the engine has row locks (PostgreSQL): concurrent
    /// claimers pass over rows another worker is taking instead of waiting for them.
    pub fn skip_locked(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "",
            Db::Postgres(_) => " FOR UPDATE SKIP LOCKED",
        }
    }
}

/// An open transaction; rolled back when dropped without [`Tx::commit`].
pub struct Tx<'a> {
    db: &'a Db,
    open: bool,
}

impl Tx<'_> {
    pub fn commit(mut self) -> DbResult<()> {
        self.open = false;
        self.db.execute_batch("COMMIT")
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.db.execute_batch("ROLLBACK");
        }
    }
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` with its password hidden (for messages and listings).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            let name = user.split(':').next().unwrap_or("");
            format!("{scheme}://{name}:***@{host}")
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact_url("postgres://kiln:s3cret@db:5432/kiln"), "postgres://kiln:***@db:5432/kiln");
        assert_eq!(redact_url("postgres://kiln@db/kiln"), "postgres://kiln@db/kiln");
        assert!(is_postgres_url("postgresql://x/y") && !is_postgres_url("studio/.kiln/library.db"));
    }

    #[test]
    fn rows_read_as_kiln_writes_them() {
        let row = Row(vec![Value::Int(-3), Value::Int(2), Value::Null, Value::Text("a".into())]);
        assert_eq!(row.get::<i64>(0), Ok(-3));
        assert_eq!(row.get::<u32>(0), Err(DbError::OutOfRange { column: 0, value: -3 }));
        assert_eq!(row.get::<f64>(1), Ok(2.0));
        assert_eq!(row.get::<Option<String>>(2), Ok(None));
        assert!(matches!(row.get::<i64>(3), Err(DbError::WrongType { .. })));
    }
}
