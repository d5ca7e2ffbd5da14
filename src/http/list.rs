//! `GET /v1/threads`: a page of the thread list in the order asked for, with an opaque
//! keyset cursor (its ordering included, so it cannot be replayed against another one).

use super::AppState;
use super::error::{ApiError, Problem};
use super::extract::QueryParams;
use super::threads::limit;
use crate::auth::Caller;
use crate::id::ThreadId;
use crate::store::{ListCursor, ListOrderBy, ListQuery, Order, ThreadSummary};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A page of the thread list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ThreadList {
    /// The threads of this page, in the order asked for.
    pub threads: Vec<ThreadSummary>,
    /// Whether another page follows (then `next_cursor` is set).
    pub has_more: bool,
    /// Pass as `cursor` to get the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
/// Query of `GET /v1/threads`.
pub struct ListParams {
    /// Only threads of this `resource_id` (a scoped caller sees only its own anyway).
    pub resource_id: Option<String>,
    /// Only children of this thread.
    pub parent_thread_id: Option<String>,
    /// `id` (default), `created_at` or `updated_at` (the last write the store holds; in
    /// buffered mode that moves when the buffered tail is folded). Ties are broken by id.
    pub order_by: Option<ListOrderBy>,
    /// `asc` (default) or `desc`; `order_by=updated_at&order=desc` is "most recently active
    /// first".
    pub order: Option<Order>,
    /// 1..200, default 50.
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<usize>,
    /// The `next_cursor` of the previous page, with the same `order_by` and `order`. Cursors
    /// are keyset positions: a thread whose sort key does not change while you page is
    /// returned exactly once.
    pub cursor: Option<String>,
}

/// List threads, filtered and ordered, with keyset cursors.
#[utoipa::path(get, path = "/v1/threads", tag = "threads", params(ListParams),
    responses((status = 200, body = ThreadList), (status = 400, body = Problem, content_type = "application/problem+json")))]
pub async fn list(
    State(app): State<AppState>,
    caller: Caller,
    QueryParams(p): QueryParams<ListParams>,
) -> Result<Json<ThreadList>, ApiError> {
    let order_by = p.order_by.unwrap_or_default();
    let order = p.order.unwrap_or_default();
    let after = match p.cursor.as_deref() {
        Some(c) => Some(decode_list_cursor(c, order_by, order).map_err(|message| {
            ApiError::InvalidQuery {
                field: "cursor".into(),
                message,
            }
        })?),
        None => None,
    };
    let q = ListQuery {
        resource_id: p.resource_id,
        parent_thread_id: p.parent_thread_id,
        order_by,
        order,
        after,
        limit: limit(p.limit)?,
    };
    let page = app.threads.list(&caller.scope, &q).await?;
    let next_cursor = page
        .has_more
        .then(|| page.threads.last())
        .flatten()
        .and_then(|t| q.cursor_after(t))
        .map(|c| encode_list_cursor(&c, order_by, order));
    Ok(Json(ThreadList {
        threads: page.threads,
        has_more: page.has_more,
        next_cursor,
    }))
}

fn order_name(order: Order) -> &'static str {
    match order {
        Order::Asc => "asc",
        Order::Desc => "desc",
    }
}

/// A listing cursor as an opaque token: base64url of `<order_by>.<order>.<key>.<id>`. The
/// ordering is part of it so a cursor cannot be replayed against another ordering, where its
/// position would mean something else.
fn encode_list_cursor(c: &ListCursor, order_by: ListOrderBy, order: Order) -> String {
    use base64::Engine;
    let raw = format!(
        "{}.{}.{}.{}",
        order_by.as_str(),
        order_name(order),
        c.key,
        c.id.as_str()
    );
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_list_cursor(s: &str, order_by: ListOrderBy, order: Order) -> Result<ListCursor, String> {
    use base64::Engine;
    let foreign = || "not a cursor this server issued".to_owned();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| foreign())?;
    let raw = String::from_utf8(raw).map_err(|_| foreign())?;
    let mut parts = raw.splitn(4, '.');
    let (Some(by), Some(dir), Some(key), Some(id)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(foreign());
    };
    if by != order_by.as_str() || dir != order_name(order) {
        return Err(format!(
            "this cursor belongs to order_by={by}&order={dir}, not order_by={}&order={}",
            order_by.as_str(),
            order_name(order)
        ));
    }
    Ok(ListCursor {
        key: key.parse().map_err(|_| foreign())?,
        id: ThreadId::parse(id).map_err(|_| foreign())?,
    })
}
