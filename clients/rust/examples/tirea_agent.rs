//! A tirea agent keeping its threads in threadgate: run a gateway (`cargo run --release`),
//! then `cargo run -p threadgate-client --example tirea_agent` (`THREADGATE_URL` overrides
//! `http://localhost:8080`).
use futures::StreamExt;
use std::sync::Arc;
use threadgate_client::{LiveEvent, ThreadgateStore};
use tirea_contract::storage::{ThreadStore, VersionPrecondition};
use tirea_contract::{CheckpointReason, Message, Thread, ThreadChangeSet, gen_message_id};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("THREADGATE_URL").unwrap_or_else(|_| "http://localhost:8080".into());
    run(&url).await
}

pub async fn run(url: &str) -> Result<(), Error> {
    // The one line that changes: build a ThreadgateStore instead of tirea's MemoryStore,
    // FileStore or PostgresStore, and hand it to the runtime as before.
    let gateway = ThreadgateStore::builder(url).retries(4).build()?;
    let store: Arc<dyn ThreadStore> = Arc::new(gateway.clone());

    // Everything below is tirea's storage API, unchanged.
    let thread = Thread::new(format!("chat-{}", gen_message_id()))
        .with_resource_id("user-1")
        .with_message(Message::system("You are a helpful assistant."));
    store.create(&thread).await?;

    // A UI (or another agent) follows the thread live from version 0.
    let mut live = gateway.follow(&thread.id, 0);

    // The runtime checkpoints every step as a ThreadChangeSet; an exact precondition makes
    // concurrent writers fail with VersionConflict instead of interleaving.
    let step = ThreadChangeSet::from_parts(
        "run-1",
        None,
        CheckpointReason::UserMessage,
        vec![Arc::new(Message::user("What is threadgate?"))],
        vec![],
        vec![],
        None,
    );
    let committed = store
        .append(&thread.id, &step, VersionPrecondition::Exact(0))
        .await?;
    println!("appended version {}", committed.version);

    let head = store.load(&thread.id).await?.ok_or("the thread is gone")?;
    println!(
        "{} messages at version {}",
        head.thread.messages.len(),
        head.version
    );

    // The follower sees the step as a typed event.
    match live.next().await {
        Some(Ok(LiveEvent::Delta { version, delta })) => {
            println!("live: version {version}: {}", delta.messages[0].content)
        }
        other => return Err(format!("expected the step, got {other:?}").into()),
    }
    store.delete(&thread.id).await?;
    Ok(())
}
