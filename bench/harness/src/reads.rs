//! Reads against their ceilings: snapshot GET and 304 revalidation vs an axum hello-world,
//! PostgreSQL GET and direct-mode append vs one trivial sqlx query per request; all with the
//! same client and concurrency in one run.

use crate::ceiling;
use crate::ctx::Ctx;
use crate::gw::{Client, Gateway, Mode, delta, message};
use crate::load::{Stats, closed_loop, count, ms};
use crate::results::{Section, Table};
use anyhow::{Result, ensure};
use serde_json::json;

/// Messages in the thread that is read.
const READ_MESSAGES: usize = 50;

/// Closed-loop `GET path` (with `If-None-Match: etag` when given) from `conns` connections.
async fn gets(ctx: &Ctx, c: &Client, path: &str, etag: Option<String>) -> Result<Stats> {
    let conns = ctx.pick(64, 4);
    let (c, path) = (c.clone(), path.to_owned());
    closed_loop(conns, ctx.warmup(), ctx.window(), move |_, _| {
        let (c, path, etag) = (c.clone(), path.clone(), etag.clone());
        async move {
            let (status, _) = c.get(&path, etag.as_deref()).await?;
            ensure!(
                etag.is_none() || status == 304,
                "revalidation answered {status}"
            );
            Ok(())
        }
    })
    .await
}

/// A thread of [`READ_MESSAGES`] messages; its ETag.
async fn seed(c: &Client) -> Result<String> {
    c.create("read", None).await?;
    let msgs: Vec<_> = (0..READ_MESSAGES).map(|i| message("seed", i)).collect();
    c.append(
        "read",
        json!({"run_id": "seed", "reason": "RunFinished", "messages": msgs, "patches": []})
            .to_string(),
    )
    .await?;
    let (_, tag) = c.get("/v1/threads/read", None).await?;
    tag.ok_or_else(|| anyhow::anyhow!("no ETag on GET"))
}

/// Reads and direct appends vs the ceilings.
pub async fn reads(ctx: &Ctx) -> Result<Section> {
    let conns = ctx.pick(64, 4);
    let hello = ceiling::Child::start(&["serve-hello"]).await?;
    let query = ceiling::Child::start(&["serve-query", "--pg", &ctx.pg]).await?;
    let insert_schema = crate::support::PgSchema::create(&ctx.pg).await?;
    let insert_url = insert_schema.url();
    let insert = ceiling::Child::start(&["serve-insert", "--pg", &insert_url]).await?;
    let mem = Gateway::start(ctx, Mode::Direct, false, "", &[]).await?;
    let pool = ceiling::QUERY_POOL.to_string();
    let pg = Gateway::start(
        ctx,
        Mode::Direct,
        true,
        "",
        &["--pg-max-connections", &pool],
    )
    .await?;
    let mem_tag = seed(&mem.client).await?;
    let pg_tag = seed(&pg.client).await?;
    for w in 0..conns {
        pg.client.create(&format!("a{w}"), None).await?;
    }
    let thread = "/v1/threads/read";

    eprintln!("[bench]   ceilings");
    let hello_s = gets(ctx, &Client::new(&hello.base), "/", None).await?;
    let query_s = gets(ctx, &Client::new(&query.base), "/", None).await?;
    let inserts = Client::new(&insert.base);
    let insert_s = closed_loop(conns, ctx.warmup(), ctx.window(), move |_, i| {
        let c = inserts.clone();
        async move {
            let body = delta("a", i, "AssistantTurnCommitted").to_string();
            let res = c.http.post(&c.base).body(body).send().await?;
            ensure!(
                res.status() == 200,
                "insert ceiling answered {}",
                res.status()
            );
            res.bytes().await?;
            Ok(())
        }
    })
    .await?;
    eprintln!("[bench]   memory store");
    let mem_get = gets(ctx, &mem.client, thread, None).await?;
    let mem_304 = gets(ctx, &mem.client, thread, Some(mem_tag)).await?;
    eprintln!("[bench]   PostgreSQL store");
    let pg_get = gets(ctx, &pg.client, thread, None).await?;
    let pg_304 = gets(ctx, &pg.client, thread, Some(pg_tag)).await?;
    let c = pg.client.clone();
    let pg_append = closed_loop(conns, ctx.warmup(), ctx.window(), move |w, i| {
        let c = c.clone();
        async move {
            let body = delta("a", i, "AssistantTurnCommitted").to_string();
            c.append(&format!("a{w}"), body).await.map(|_| ())
        }
    })
    .await?;
    mem.stop().await;
    pg.stop().await;
    drop(insert);
    insert_schema.drop().await;

    let row = |name: &str, s: &Stats, ceiling: Option<(&Stats, f64)>| {
        vec![
            name.to_owned(),
            count(s.rate),
            ms(s.p50),
            ms(s.p99),
            ceiling.map_or("1.00× (ceiling)".into(), |(c, target)| {
                format!("{:.2}× (target ≥ {target})", s.rate / c.rate)
            }),
        ]
    };
    let rows = vec![
        row("axum hello world, GET /", &hello_s, None),
        row(
            &format!("memory: GET thread ({READ_MESSAGES} messages)"),
            &mem_get,
            Some((&hello_s, 0.5)),
        ),
        row(
            "memory: GET thread, If-None-Match (304)",
            &mem_304,
            Some((&hello_s, 0.8)),
        ),
        row("one sqlx query (SELECT 1) per request", &query_s, None),
        row(
            &format!("PostgreSQL: GET thread ({READ_MESSAGES} messages)"),
            &pg_get,
            Some((&query_s, 0.5)),
        ),
        row(
            "PostgreSQL: GET thread, If-None-Match (304)",
            &pg_304,
            Some((&query_s, 0.5)),
        ),
        row(
            "PostgreSQL direct mode: POST delta (one message; a thread per connection)",
            &pg_append,
            Some((&query_s, 0.5)),
        ),
        row(
            "one committed single-row INSERT per request (same delta JSON as body)",
            &insert_s,
            None,
        ),
        row(
            "PostgreSQL direct mode: POST delta, against the INSERT ceiling",
            &pg_append,
            Some((&insert_s, 0.5)),
        ),
    ];
    Ok(Section {
        id: "reads".into(),
        title: "Reads and direct appends against their ceilings".into(),
        notes: vec![format!(
            "Closed loop from {conns} keep-alive connections for {:?} each, the client in the \
             harness process on the same cores as the server. Ceilings: an axum hello-world and \
             an axum route running `SELECT 1` on a 16-connection sqlx pool (the PostgreSQL gateway \
             runs with the same pool size, `--pg-max-connections 16`), each its own process, and, for writes, an axum route that inserts its \
             body as one row committed on its own (a durable write's least cost: one round trip \
             and a WAL flush). Ratios are requests/s against the ceiling.",
            ctx.window()
        )],
        table: Table {
            columns: ["scenario", "requests/s", "p50", "p99", "÷ ceiling"]
                .map(String::from)
                .to_vec(),
            rows,
        },
        plots: Vec::new(),
    })
}
