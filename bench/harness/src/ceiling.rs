//! The ceilings the gateway's reads and writes are compared with, served the way threadgate
//! serves (axum 0.8, multi-threaded tokio) from a child process of their own, so client and
//! server share the machine exactly as they do when the gateway is measured.

use anyhow::{Context, Result};
use axum::{Router, routing::get};

/// Pool size of the ceilings' sqlx pools; the PostgreSQL gateway they are compared with runs
/// with the same `--pg-max-connections` (its default is 10).
pub const QUERY_POOL: u32 = 16;

/// The ceilings' pool of [`QUERY_POOL`] connections to `pg`.
async fn pool(pg: &str) -> Result<sqlx::PgPool> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(QUERY_POOL)
        .connect(pg)
        .await
        .with_context(|| format!("PostgreSQL at {pg}"))
}

/// `GET /` answers `hello`.
pub async fn serve_hello() -> Result<()> {
    serve(Router::new().route("/", get(|| async { "hello" }))).await
}

/// `GET /` runs `SELECT 1` on a pooled connection and answers its result.
pub async fn serve_query(pg: &str) -> Result<()> {
    let pool = pool(pg).await?;
    let app = Router::new().route(
        "/",
        get(move || {
            let pool = pool.clone();
            async move {
                let one: i32 = sqlx::query_scalar("SELECT 1")
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(0);
                one.to_string()
            }
        }),
    );
    serve(app).await
}

/// `POST /` inserts its body as one row, committed on its own (what any durable write costs
/// at least: one round trip and a WAL flush), and answers the row's id.
pub async fn serve_insert(pg: &str) -> Result<()> {
    let pool = pool(pg).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS ceiling (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let app = Router::new().route(
        "/",
        axum::routing::post(move |body: String| {
            let pool = pool.clone();
            async move {
                let id: i64 =
                    sqlx::query_scalar("INSERT INTO ceiling (body) VALUES ($1) RETURNING id")
                        .bind(body)
                        .fetch_one(&pool)
                        .await
                        .unwrap_or(0);
                id.to_string()
            }
        }),
    );
    serve(app).await
}

/// Listens on a free loopback port and says where on stdout (one line: `listening <addr>`).
async fn serve(app: Router) -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

/// A ceiling server as a child process of this binary; killed when dropped.
pub struct Child {
    _child: tokio::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
}

impl Child {
    /// Starts `harness <args>` and waits for its `listening` line.
    pub async fn start(args: &[&str]) -> Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .context("ceiling server did not start")??
            .context("ceiling server exited")?;
        let addr = line
            .strip_prefix("listening ")
            .context("unexpected first line")?;
        Ok(Child {
            base: format!("http://{addr}"),
            _child: child,
        })
    }
}
