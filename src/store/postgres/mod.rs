//! The PostgreSQL backend.
//!
//! Why it looks the way it does:
//!
//! * **JSON as text.** Every document (messages, patches, states, metadata, history) is the
//!   serde_json text of the value, in a `TEXT` column, never `jsonb`: `jsonb` turns `1e+16`
//!   into an integer and rejects U+0000, and both must round-trip exactly (see
//!   `docs/wire.md`). serde_json escapes U+0000 as `\u0000`, so its output is always valid
//!   PostgreSQL text. Client strings that get a column of their own (resource and parent ids,
//!   message and run ids, idempotency keys) are stored JSON-encoded for the same reason, and
//!   every lookup compares the encoded form (the encoding is injective). See [`codec`].
//! * **A row per message and per patch.** An append inserts only the new rows and updates
//!   the thread row (counts, current state, version), so its cost does not grow with the
//!   length of the thread; message pages are index range scans on `(thread_id, cursor)`.
//!   The materialised current state is kept on the thread row so an append validates its
//!   patches without replaying the thread's patch list. See [`write`].
//! * **Row locks for compare-and-set.** Every write is one transaction that first locks the
//!   thread row (`SELECT ... FOR UPDATE`) and checks the expected version or watermark
//!   against the locked row, so concurrent writers to one thread are serialised by
//!   PostgreSQL and each gets a distinct, real, committed version; writers to different
//!   threads never wait for each other.
//! * **Snapshot reads.** Every read is one statement (a snapshot aggregates its messages
//!   and patches beside the thread row), so the version it reports matches the data it
//!   returns, in one round trip and with no transaction. See [`read`].
//! * **Transactions nobody can cut in half.** Every transaction runs in a task of its own,
//!   so a client that hangs up cannot cancel it midway, and on a connection guarded by
//!   [`Tx`]: sqlx 0.8.4 to 0.9.0 hand a connection back to the pool inside an open
//!   transaction when a `BEGIN` is cancelled (sqlx issues #4385/#4393, fixed upstream by pull
//!   request #4394, in no release yet); a [`Tx`] that did not end in `COMMIT` or `ROLLBACK`
//!   closes its connection instead of returning it.

mod codec;
mod heads;
mod notify;
mod read;
mod rows;
mod write;

use super::changes::Changes;
use super::{
    Appended, ChangeSet, Expect, History, IdempotencyKey, Incarnation, ListPage, ListQuery,
    MessagePage, MessageQuery, Result, RunRecord, Snapshot, StateAt, Store, StoreError, Write,
    now_ms,
};
use crate::id::ThreadId;
use crate::model::{Extra, Thread};
use async_trait::async_trait;
use codec::db_err;
use sqlx::migrate::Migrator;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, Postgres};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The schema, embedded at compile time. `Migrator::run` takes a PostgreSQL advisory lock
/// (locking is on by default in sqlx 0.8), so replicas starting together migrate once.
/// Migrations this build does not know (applied by a newer version during a rolling
/// upgrade, or before a rollback) are ignored rather than refused: they are additive, so an
/// older replica keeps working on the newer schema.
fn migrator() -> Migrator {
    let mut m = sqlx::migrate!();
    m.set_ignore_missing(true);
    m
}

/// How often each process's listener checks its connection and the versions of the threads
/// it follows (see `notify.rs`).
pub const LISTENER_HEARTBEAT: Duration = notify::HEARTBEAT;

/// `BEGIN` of a write transaction.
const BEGIN_WRITE: &str = "BEGIN";
/// `BEGIN` of a read that spans several statements: one snapshot for all of them.
const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
/// `application_name` of the gateway's sessions (unless the URL names one), so an operator
/// (and the tests) can find them in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "threadgate";

/// How the pool talks to PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connections per gateway process.
    pub max_connections: u32,
    /// How long a request waits for a pooled connection before it answers 503.
    pub acquire_timeout: Duration,
    /// Server-side bound on any one statement (`statement_timeout`), lock waits included.
    pub statement_timeout: Duration,
    /// How long start-up keeps retrying an unreachable server before giving up.
    pub startup_timeout: Duration,
    /// Announce every committed write with `NOTIFY` (direct mode, so other replicas' live
    /// streams carry it); off in buffered mode, which follows the JetStream log instead.
    pub notify: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            // Writes hold a connection only for a short transaction, and several replicas
            // must fit under PostgreSQL's default limit of 100.
            max_connections: 10,
            // Past this the database is effectively unreachable: a quick 503, not a hang.
            acquire_timeout: Duration::from_secs(5),
            // Longer than any healthy statement (a 1,000-entry fold chunk takes < 1 s).
            statement_timeout: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(30),
            notify: true,
        }
    }
}

/// A thread's snapshot in PostgreSQL; see the module docs.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// How the pool connects (the notification listener connects the same way).
    connect: PgConnectOptions,
    /// The listener's announcements, started by the first [`Store::changes`] call.
    changes: Arc<std::sync::OnceLock<Arc<Changes>>>,
    /// Ends the listener and the announcer at [`Store::close`].
    stop: CancellationToken,
    listener: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// Announces this process's commits to every replica (direct mode; see `notify.rs`).
    announcer: Option<Arc<notify::Announcer>>,
    announcing: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// The thread rows this process's appends left, for one-statement appends (`heads.rs`).
    heads: Arc<heads::Heads>,
    /// Appends that took one statement (see [`PostgresStore::one_statement_appends`]).
    one_statement: Arc<std::sync::atomic::AtomicU64>,
}

impl PostgresStore {
    /// Connects to `url` (any libpq-style URL sqlx accepts, e.g. with
    /// `?options=-c%20search_path%3Dmy_schema`) and applies pending migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        Self::connect_opts(url, &PgOptions::default()).await
    }

    /// [`PostgresStore::connect`] with explicit pool settings; an unreachable server is
    /// retried with back-off for `startup_timeout`.
    pub async fn connect_opts(url: &str, opts: &PgOptions) -> anyhow::Result<Self> {
        let mut connect = PgConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL: {e}"))?;
        // An `application_name` in the URL wins (several gateways on one database).
        if connect.get_application_name().is_none() {
            connect = connect.application_name(APPLICATION_NAME);
        }
        let connect = connect.options([(
            "statement_timeout",
            opts.statement_timeout.as_millis().to_string(),
        )]);
        crate::app::retry_startup("PostgreSQL", opts.startup_timeout, || {
            Self::connect_with(connect.clone(), opts)
        })
        .await
    }

    /// Connects with explicit options and applies pending migrations (no retry).
    pub async fn connect_with(connect: PgConnectOptions, opts: &PgOptions) -> anyhow::Result<Self> {
        // Read by the triggers of migrations/0005_notify.sql: this version announces its
        // commits itself, after they are made (see `notify.rs`).
        let connect = connect.options([("threadgate.notify", "off")]);
        // Migrate on a connection of its own, closed afterwards: the migrator's advisory lock
        // is session-level, so a failed run must not hand a still-locked session to the pool.
        let mut conn = PgConnection::connect_with(&connect)
            .await
            .map_err(connect_error)?;
        migrator()
            .run(&mut conn)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL migration failed: {e}"))?;
        conn.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(connect.clone())
            .await
            .map_err(connect_error)?;
        let stop = CancellationToken::new();
        let announcer = opts.notify.then(|| Arc::new(notify::Announcer::default()));
        let announcing = announcer
            .clone()
            .map(|a| tokio::spawn(a.run(pool.clone(), stop.clone())));
        Ok(PostgresStore {
            pool,
            connect,
            changes: Default::default(),
            stop,
            listener: Default::default(),
            announcer,
            announcing: Arc::new(std::sync::Mutex::new(announcing)),
            heads: Default::default(),
            one_statement: Default::default(),
        })
    }
}

/// A failed connect as a start-up error: one that waiting cannot cure (TLS refused, a
/// credential or `pg_hba.conf` refusal, a missing database, bad settings) is
/// [`crate::app::Permanent`], so start-up reports it at once instead of retrying.
fn connect_error(e: sqlx::Error) -> anyhow::Error {
    let why = match &e {
        // rustls's refusal arrives as an I/O error carrying it.
        sqlx::Error::Io(io) if crate::app::tls_refused(io) => Some(
            "TLS with PostgreSQL failed (with sslmode=verify-ca or verify-full: the server's \
             certificate must be signed by a CA in sslrootcert or the public roots, and with \
             verify-full name the host of the URL)",
        ),
        sqlx::Error::Tls(_) => Some(
            "TLS with PostgreSQL failed (with sslmode=verify-ca or verify-full: the server's \
             certificate must be signed by a CA in sslrootcert or the public roots, and with \
             verify-full name the host of the URL)",
        ),
        sqlx::Error::Database(d) => match d.code().as_deref() {
            // invalid_password, invalid_authorization_specification (pg_hba.conf)
            Some("28P01" | "28000") => Some("PostgreSQL refused the connection"),
            // invalid_catalog_name
            Some("3D000") => Some("the database does not exist"),
            _ => None,
        },
        sqlx::Error::Configuration(_) => Some("invalid PostgreSQL connection settings"),
        _ => None,
    };
    match why {
        Some(why) => anyhow::Error::new(crate::app::Permanent(format!("{why}: {e}"))),
        None => anyhow::anyhow!("cannot connect to PostgreSQL: {e}"),
    }
}

/// Runs `$body` (an async expression using `$conn: &mut PgConnection`) in a transaction begun
/// with `$begin`, in a task of its own (see the module docs): it completes even if the caller
/// stops waiting. A macro, not a closure-taking function: a closure over a higher-ranked
/// connection lifetime trips rustc's `Send` inference for sqlx futures.
/// `then $after` runs `$after(&value)` in the same task once the transaction committed (to
/// announce it: a caller that stops waiting cannot skip that).
macro_rules! in_task {
    ($store:expr, $begin:expr, |$conn:ident| $body:expr) => {
        in_task!($store, $begin, |$conn| $body, then | _ | {})
    };
    ($store:expr, $begin:expr, |$conn:ident| $body:expr, then $after:expr) => {{
        let pool = $store.pool.clone();
        spawned(async move {
            let mut tx = Tx::begin(&pool, $begin).await?;
            let result = {
                let $conn: &mut PgConnection = &mut *tx.conn;
                $body.await
            };
            let value = tx.end(result).await?;
            #[allow(clippy::redundant_closure_call)]
            ($after)(&value);
            Ok(value)
        })
        .await
    }};
}

impl PostgresStore {
    /// What announces a commit of `id` at a version (nothing in buffered mode).
    fn announce_written(&self, id: &ThreadId) -> impl FnOnce(u64) + Send + 'static {
        let (announcer, id) = (self.announcer.clone(), id.clone());
        move |version| {
            if let Some(a) = announcer {
                a.written(&id, version);
            }
        }
    }

    /// For a write other than an append: forgets the head remembered for `id` (the write
    /// moves the row) and returns what announces its commit, for `in_task!`'s `then`.
    fn other_write(&self, id: &ThreadId) -> impl FnOnce(&u64) + Send + 'static {
        self.heads.forget(id);
        let announce = self.announce_written(id);
        move |version| announce(*version)
    }

    /// How many appends through this store were made by one statement rather than by the
    /// locking transaction (see `heads.rs`).
    pub fn one_statement_appends(&self) -> u64 {
        self.one_statement
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The snapshot of `id` read in several statements inside one `REPEATABLE READ READ ONLY`
    /// transaction: what [`Store::get`] falls back to when a thread is too large for its
    /// one-statement read (PostgreSQL caps a value and a row at 1 GB). Public so that the
    /// tests can hold both reads to the same answer.
    pub async fn get_paged(&self, id: &ThreadId) -> Result<Snapshot> {
        let id = id.clone();
        in_task!(self, BEGIN_READ, |c| read::get_paged(c, id))
    }
}

/// Runs a store operation to completion in its own task.
async fn spawned<T: Send + 'static>(
    op: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(op)
        .await
        .map_err(|e| StoreError::Internal(format!("store task failed: {e}")))?
}

/// A pooled connection inside a transaction that this code began itself. Unless it ended in a
/// successful `COMMIT` or `ROLLBACK`, dropping it closes the connection rather than return it
/// to the pool, so no later borrower can run inside a stale transaction.
struct Tx {
    conn: PoolConnection<Postgres>,
    open: bool,
}

impl Tx {
    async fn begin(pool: &PgPool, begin: &'static str) -> Result<Tx> {
        let conn = pool.acquire().await.map_err(db_err)?;
        // Open before BEGIN is sent: a cancellation while it is in flight must close.
        let mut tx = Tx { conn, open: true };
        (&mut *tx.conn).execute(begin).await.map_err(db_err)?;
        Ok(tx)
    }

    /// Commits after a success, rolls back after a failure, and passes the result on.
    async fn end<T>(self, result: Result<T>) -> Result<T> {
        match result {
            Ok(v) => {
                self.commit().await?;
                Ok(v)
            }
            Err(e) => {
                self.rollback().await;
                Err(e)
            }
        }
    }

    async fn commit(mut self) -> Result<()> {
        (&mut *self.conn).execute("COMMIT").await.map_err(db_err)?;
        self.open = false;
        Ok(())
    }

    async fn rollback(mut self) {
        if (&mut *self.conn).execute("ROLLBACK").await.is_ok() {
            self.open = false;
        }
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create(&self, id: &ThreadId, mut thread: Thread) -> Result<Snapshot> {
        let current = super::prepare_thread(id, &mut thread)?;
        let id = id.clone();
        in_task!(self, BEGIN_WRITE, |c| write::create(
            c,
            id,
            thread,
            current,
            now_ms()
        ))
    }

    async fn get(&self, id: &ThreadId) -> Result<Snapshot> {
        // In a task of its own like a write, so a client that hangs up never cuts it off.
        let (pool, one) = (self.pool.clone(), id.clone());
        if let Some(snapshot) = spawned(async move { read::get(&pool, &one).await }).await? {
            return Ok(snapshot);
        }
        self.get_paged(id).await
    }

    async fn version(&self, id: &ThreadId) -> Result<u64> {
        read::version(&self.pool, id).await
    }

    async fn incarnation(&self, id: &ThreadId) -> Result<Incarnation> {
        read::incarnation(&self.pool, id).await
    }

    async fn owner(&self, id: &ThreadId) -> Result<super::Owner> {
        read::owner(&self.pool, id).await
    }

    async fn list(&self, q: &ListQuery) -> Result<ListPage> {
        read::list(&self.pool, q).await
    }

    async fn replace(&self, id: &ThreadId, mut thread: Thread, expect: Expect) -> Result<u64> {
        let current = super::prepare_thread(id, &mut thread)?;
        let announce = self.other_write(id);
        let id = id.clone();
        in_task!(
            self,
            BEGIN_WRITE,
            |c| write::replace(c, id, thread, current, expect, now_ms()),
            then announce
        )
    }

    async fn patch_metadata(&self, id: &ThreadId, mut patch: Extra, expect: Expect) -> Result<u64> {
        super::strip_server_metadata(&mut patch);
        let announce = self.other_write(id);
        let id = id.clone();
        in_task!(
            self,
            BEGIN_WRITE,
            |c| write::patch_metadata(c, id, patch, expect, now_ms()),
            then announce
        )
    }

    async fn delete(&self, id: &ThreadId, expect: Expect) -> Result<()> {
        self.heads.forget(id);
        let (announcer, one) = (self.announcer.clone(), id.clone());
        let announce = move |version: &u64| {
            if let Some(a) = announcer {
                a.deleted(&one, *version);
            }
        };
        let id = id.clone();
        in_task!(self, BEGIN_WRITE, |c| write::delete(c, id, expect), then announce).map(|_| ())
    }

    async fn append(
        &self,
        id: &ThreadId,
        delta: &ChangeSet,
        expect: Expect,
        idempotency: Option<&IdempotencyKey>,
    ) -> Result<Appended> {
        if let Some(head) = self.heads.get(id) {
            let (pool, one, delta, key) = (
                self.pool.clone(),
                id.clone(),
                delta.clone(),
                idempotency.cloned(),
            );
            let announce = self.announce_written(id);
            let done = spawned(async move {
                let done = heads::append(&pool, &one, &head, delta, expect, key.as_ref(), now_ms())
                    .await?;
                if let Some((appended, _)) = &done {
                    announce(appended.version);
                }
                Ok(done)
            })
            .await?;
            if let Some((appended, head)) = done {
                self.heads.put(id, head);
                self.one_statement
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(appended);
            }
        }
        let announce = self.announce_written(id);
        let (one, delta, key) = (id.clone(), delta.clone(), idempotency.cloned());
        let (appended, head) = in_task!(
            self,
            BEGIN_WRITE,
            |c| write::append(c, one, delta, expect, key, now_ms()),
            then |(a, _): &(Appended, Option<rows::Head>)| {
                if !a.replayed {
                    announce(a.version)
                }
            }
        )?;
        match head {
            Some(head) => self.heads.put(id, head.into()),
            None => self.heads.forget(id),
        }
        Ok(appended)
    }

    async fn idempotent(&self, id: &ThreadId, key: &IdempotencyKey) -> Result<Option<Appended>> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        match rows::remembered(&mut conn, id.as_str(), key).await? {
            Some(replay) => Ok(Some(replay)),
            // Unknown key: a missing thread is still NotFound.
            None => self.version(id).await.map(|_| None),
        }
    }

    async fn apply_batch(&self, id: &ThreadId, entries: Vec<Write>) -> Result<u64> {
        let announce = self.other_write(id);
        let id = id.clone();
        in_task!(
            self,
            BEGIN_WRITE,
            |c| write::apply_batch(c, id, entries, now_ms()),
            then announce
        )
    }

    async fn messages(&self, id: &ThreadId, q: &MessageQuery) -> Result<MessagePage> {
        read::messages(&self.pool, id, q).await
    }

    async fn state(&self, id: &ThreadId) -> Result<StateAt> {
        read::state(&self.pool, id).await
    }

    async fn history(&self, id: &ThreadId, after: u64, limit: usize) -> Result<History> {
        read::history(&self.pool, id, after, limit).await
    }

    async fn runs(&self, id: &ThreadId) -> Result<Vec<RunRecord>> {
        read::runs(&self.pool, id).await
    }

    async fn run(&self, id: &ThreadId, run_id: &str) -> Result<RunRecord> {
        read::run(&self.pool, id, run_id).await
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// Every replica's writes, from `LISTEN` (see `notify.rs`); the listener starts with the
    /// first call and ends at [`Store::close`].
    fn changes(&self) -> Option<Arc<Changes>> {
        let changes = self.changes.get_or_init(|| {
            let changes = Arc::new(Changes::default());
            let task = tokio::spawn(notify::listen(
                self.connect.clone(),
                self.pool.clone(),
                changes.clone(),
                self.stop.clone(),
            ));
            if let Ok(mut slot) = self.listener.lock() {
                *slot = Some(task);
            }
            changes
        });
        Some(changes.clone())
    }

    async fn close(&self) {
        self.stop.cancel();
        for slot in [&self.listener, &self.announcing] {
            let task = slot.lock().ok().and_then(|mut t| t.take());
            if let Some(task) = task {
                let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
            }
        }
        self.pool.close().await;
    }
}
