//! Reads: each is one statement (its result is one consistent snapshot, so the version a
//! read reports always matches the data it returns), with no transaction around it: a
//! snapshot aggregates its messages and patches in the same statement as the thread row.
//! The one exception is a thread too large for that (PostgreSQL caps one value, and one
//! row, at 1 GB): [`get`] says so and [`get_paged`] reads it in several statements inside
//! one `REPEATABLE READ READ ONLY` transaction, which gives the same one snapshot.

use super::codec::{
    JoinedHistoryRow, JoinedMessageRow, JoinedRunRow, SnapshotRow, SummaryRow, ThreadRow, db_err,
    dec_opt, enc, from_json, inc, u,
};
use crate::id::ThreadId;
use crate::model::{Message, Thread};
use crate::store::{
    History, Incarnation, ListOrderBy, ListPage, ListQuery, MessagePage, MessageQuery, Order,
    Result, RunRecord, Snapshot, StateAt, StoreError, VisibilityFilter,
};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};

/// SQLSTATE `program_limit_exceeded`: what PostgreSQL raises when an aggregated array or a
/// result row would pass its 1 GB allocation limit.
const PROGRAM_LIMIT_EXCEEDED: &str = "54000";

/// [`crate::store::Store::get`]: one statement (so one consistent snapshot, with no
/// transaction around it): the thread row with its messages and patches aggregated in order.
/// `None` when the thread is too large to travel in one row: read it with [`get_paged`].
pub async fn get(pool: &PgPool, id: &ThreadId) -> Result<Option<Snapshot>> {
    let row: Option<SnapshotRow> = match sqlx::query_as(
        "SELECT t.id, t.resource_id, t.parent_thread_id, t.version, t.watermark, \
           t.incarnation, t.state, t.metadata, t.created_at, t.updated_at, \
           ARRAY(SELECT m.body FROM messages m WHERE m.thread_id = t.id ORDER BY m.cursor) \
             AS messages, \
           ARRAY(SELECT p.body FROM patches p WHERE p.thread_id = t.id ORDER BY p.seq) \
             AS patches \
         FROM threads t WHERE t.id = $1",
    )
    .bind(id.as_str())
    .fetch_optional(pool)
    .await
    {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(PROGRAM_LIMIT_EXCEEDED) => {
            return Ok(None);
        }
        other => other.map_err(db_err)?,
    };
    let SnapshotRow {
        thread,
        messages,
        patches,
    } = row.ok_or(StoreError::NotFound)?;
    snapshot(thread, &messages, &patches).map(Some)
}

/// [`get`] in several statements, for a thread too large for one row; run it inside one
/// `REPEATABLE READ READ ONLY` transaction so that it reads one snapshot.
pub async fn get_paged(conn: &mut PgConnection, id: ThreadId) -> Result<Snapshot> {
    let row: Option<ThreadRow> = sqlx::query_as(
        "SELECT id, resource_id, parent_thread_id, version, watermark, incarnation, state, \
         metadata, created_at, updated_at FROM threads WHERE id = $1",
    )
    .bind(id.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_err)?;
    let row = row.ok_or(StoreError::NotFound)?;
    let messages: Vec<String> =
        sqlx::query_scalar("SELECT body FROM messages WHERE thread_id = $1 ORDER BY cursor")
            .bind(id.as_str())
            .fetch_all(&mut *conn)
            .await
            .map_err(db_err)?;
    let patches: Vec<String> =
        sqlx::query_scalar("SELECT body FROM patches WHERE thread_id = $1 ORDER BY seq")
            .bind(id.as_str())
            .fetch_all(&mut *conn)
            .await
            .map_err(db_err)?;
    snapshot(row, &messages, &patches)
}

/// A snapshot from its thread row and its message and patch bodies in order.
fn snapshot(row: ThreadRow, messages: &[String], patches: &[String]) -> Result<Snapshot> {
    Ok(Snapshot {
        thread: Thread {
            id: row.id,
            resource_id: dec_opt(row.resource_id)?,
            parent_thread_id: dec_opt(row.parent_thread_id)?,
            messages: messages
                .iter()
                .map(|m| from_json(m))
                .collect::<Result<_>>()?,
            state: from_json(&row.state)?,
            patches: patches
                .iter()
                .map(|p| from_json(p))
                .collect::<Result<_>>()?,
            metadata: from_json(&row.metadata)?,
        },
        version: u(row.version),
        watermark: u(row.watermark),
        incarnation: inc(row.incarnation),
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// [`crate::store::Store::version`].
pub async fn version(pool: &PgPool, id: &ThreadId) -> Result<u64> {
    let v: Option<i64> = sqlx::query_scalar("SELECT version FROM threads WHERE id = $1")
        .bind(id.as_str())
        .fetch_optional(pool)
        .await
        .map_err(db_err)?;
    v.map(u).ok_or(StoreError::NotFound)
}

/// [`crate::store::Store::incarnation`].
pub async fn incarnation(pool: &PgPool, id: &ThreadId) -> Result<Incarnation> {
    let v: Option<i64> = sqlx::query_scalar("SELECT incarnation FROM threads WHERE id = $1")
        .bind(id.as_str())
        .fetch_optional(pool)
        .await
        .map_err(db_err)?;
    v.map(inc).ok_or(StoreError::NotFound)
}

/// [`crate::store::Store::owner`]: the primary key lookup of `version`, with `resource_id`.
pub async fn owner(pool: &PgPool, id: &ThreadId) -> Result<crate::store::Owner> {
    let row: Option<(Option<String>, i64, i64)> =
        sqlx::query_as("SELECT resource_id, version, incarnation FROM threads WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(pool)
            .await
            .map_err(db_err)?;
    let (resource_id, version, incarnation) = row.ok_or(StoreError::NotFound)?;
    Ok(crate::store::Owner {
        resource_id: dec_opt(resource_id)?,
        version: u(version),
        incarnation: inc(incarnation),
    })
}

/// [`crate::store::Store::list`]: keyset paging by id.
pub async fn list(pool: &PgPool, q: &ListQuery) -> Result<ListPage> {
    let mut sql = QueryBuilder::<Postgres>::new(
        "SELECT id, resource_id, parent_thread_id, version, created_at, updated_at, \
         message_count, metadata FROM threads WHERE true",
    );
    if let Some(r) = &q.resource_id {
        sql.push(" AND resource_id = ").push_bind(enc(r));
    }
    if let Some(p) = &q.parent_thread_id {
        sql.push(" AND parent_thread_id = ").push_bind(enc(p));
    }
    push_list_order(&mut sql, q);
    sql.push(" LIMIT ")
        .push_bind(i64::try_from(q.limit.saturating_add(1)).unwrap_or(i64::MAX));
    let rows: Vec<SummaryRow> = sql.build_query_as().fetch_all(pool).await.map_err(db_err)?;
    let has_more = rows.len() > q.limit;
    let threads = rows
        .into_iter()
        .take(q.limit)
        .map(SummaryRow::decode)
        .collect::<Result<_>>()?;
    Ok(ListPage { threads, has_more })
}

/// The keyset condition and `ORDER BY` of a thread listing (see migrations/0002): rows
/// strictly after the cursor in `(key, id)` order, compared as a row so that one index range
/// scan on `(key, id)` (or `(resource_id, key, id)`) serves it. Ids compare byte-wise ("C").
fn push_list_order(sql: &mut QueryBuilder<'_, Postgres>, q: &ListQuery) {
    let (cmp, dir) = match q.order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    let column = match q.order_by {
        ListOrderBy::Id => None,
        ListOrderBy::CreatedAt => Some("created_at"),
        ListOrderBy::UpdatedAt => Some("updated_at"),
    };
    if let Some(after) = &q.after {
        let id = after.id.as_str().to_owned();
        match column {
            None => {
                sql.push(format_args!(" AND id {cmp} "))
                    .push_bind(id)
                    .push(" COLLATE \"C\"");
            }
            Some(col) => {
                sql.push(format_args!(" AND ({col}, id) {cmp} ("))
                    .push_bind(after.key)
                    .push(", ")
                    .push_bind(id)
                    .push(" COLLATE \"C\")");
            }
        }
    }
    match column {
        None => sql.push(format_args!(" ORDER BY id {dir}")),
        Some(col) => sql.push(format_args!(" ORDER BY {col} {dir}, id {dir}")),
    };
}

/// [`crate::store::Store::messages`], in one statement so the version matches the page.
pub async fn messages(pool: &PgPool, id: &ThreadId, q: &MessageQuery) -> Result<MessagePage> {
    let dir = match q.order {
        Order::Asc => "ASC",
        Order::Desc => "DESC",
    };
    // A missing thread yields no row, a thread without matching messages one row with NULLs.
    let mut sql = QueryBuilder::<Postgres>::new(
        "SELECT t.version, m.cursor, m.body FROM threads t LEFT JOIN LATERAL \
         (SELECT cursor, body FROM messages WHERE thread_id = t.id",
    );
    if let Some(after) = q.after {
        sql.push(" AND cursor > ")
            .push_bind(i64::try_from(after).unwrap_or(i64::MAX));
    }
    if let Some(before) = q.before {
        sql.push(" AND cursor < ")
            .push_bind(i64::try_from(before).unwrap_or(i64::MAX));
    }
    match q.visibility {
        VisibilityFilter::All => {
            sql.push(" AND NOT internal");
        }
        VisibilityFilter::Internal => {
            sql.push(" AND internal");
        }
        VisibilityFilter::Any => {}
    }
    if let Some(run) = &q.run_id {
        sql.push(" AND run_id = ").push_bind(enc(run));
    }
    sql.push(format_args!(" ORDER BY cursor {dir} LIMIT "))
        .push_bind(i64::try_from(q.limit.saturating_add(1)).unwrap_or(i64::MAX))
        .push(") m ON true WHERE t.id = ")
        .push_bind(id.as_str().to_owned())
        .push(format_args!(" ORDER BY m.cursor {dir}"));
    let rows: Vec<JoinedMessageRow> = sql.build_query_as().fetch_all(pool).await.map_err(db_err)?;
    let version = rows
        .first()
        .map(|r| u(r.version))
        .ok_or(StoreError::NotFound)?;
    let mut messages = Vec::with_capacity(rows.len());
    for row in rows {
        if let (Some(cursor), Some(body)) = (row.cursor, row.body) {
            messages.push((u(cursor), from_json::<Message>(&body)?));
        }
    }
    let has_more = messages.len() > q.limit;
    messages.truncate(q.limit);
    Ok(MessagePage {
        messages,
        has_more,
        version,
    })
}

#[derive(sqlx::FromRow)]
struct StateRow {
    current_state: String,
    version: i64,
    incarnation: i64,
}

/// [`crate::store::Store::state`].
pub async fn state(pool: &PgPool, id: &ThreadId) -> Result<StateAt> {
    let row: Option<StateRow> =
        sqlx::query_as("SELECT current_state, version, incarnation FROM threads WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(pool)
            .await
            .map_err(db_err)?;
    let row = row.ok_or(StoreError::NotFound)?;
    Ok(StateAt {
        state: from_json(&row.current_state)?,
        version: u(row.version),
        incarnation: inc(row.incarnation),
    })
}

/// [`crate::store::Store::history`], in one statement.
pub async fn history(pool: &PgPool, id: &ThreadId, after: u64, limit: usize) -> Result<History> {
    let rows: Vec<JoinedHistoryRow> = sqlx::query_as(
        "SELECT t.version AS thread_version, \
           (SELECT min(version) FROM history WHERE thread_id = t.id) AS first_kept, \
           h.version, h.at, h.change \
         FROM threads t LEFT JOIN LATERAL \
           (SELECT version, at, change FROM history \
            WHERE thread_id = t.id AND version > $2 ORDER BY version LIMIT $3) h ON true \
         WHERE t.id = $1 ORDER BY h.version",
    )
    .bind(id.as_str())
    .bind(i64::try_from(after).unwrap_or(i64::MAX))
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    let (version, first_kept) = rows
        .first()
        .map(|r| (u(r.thread_version), r.first_kept.map(u)))
        .ok_or(StoreError::NotFound)?;
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(write) = row.decode()? {
            entries.push(write);
        }
    }
    Ok(History {
        entries,
        first_kept,
        version,
    })
}

/// [`crate::store::Store::runs`], ordered like the other backends.
pub async fn runs(pool: &PgPool, id: &ThreadId) -> Result<Vec<RunRecord>> {
    let rows: Vec<JoinedRunRow> = sqlx::query_as(
        "SELECT r.run_id, r.parent_run_id, r.meta, r.version, r.created_at, r.updated_at \
         FROM threads t LEFT JOIN runs r ON r.thread_id = t.id WHERE t.id = $1",
    )
    .bind(id.as_str())
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    if rows.is_empty() {
        return Err(StoreError::NotFound);
    }
    let mut runs = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(run) = row.decode(id.as_str())? {
            runs.push(run);
        }
    }
    // Sorted here on the decoded ids so the order is the same as the other backends'.
    runs.sort_by(|a, b| (a.created_at, &a.run_id).cmp(&(b.created_at, &b.run_id)));
    Ok(runs)
}

/// [`crate::store::Store::run`].
pub async fn run(pool: &PgPool, id: &ThreadId, run_id: &str) -> Result<RunRecord> {
    let row: Option<JoinedRunRow> = sqlx::query_as(
        "SELECT r.run_id, r.parent_run_id, r.meta, r.version, r.created_at, r.updated_at \
         FROM threads t LEFT JOIN runs r ON r.thread_id = t.id AND r.run_id = $2 \
         WHERE t.id = $1",
    )
    .bind(id.as_str())
    .bind(enc(run_id))
    .fetch_optional(pool)
    .await
    .map_err(db_err)?;
    row.ok_or(StoreError::NotFound)?
        .decode(id.as_str())?
        .ok_or(StoreError::RunNotFound)
}
