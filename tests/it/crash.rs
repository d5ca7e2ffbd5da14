//! Buffered mode under crashes, replicas and long runs: the real binary over real HTTP, with
//! real NATS JetStream and a PostgreSQL store in a fresh schema, each test on its own stream
//! prefix. Every final thread is compared field by field with an oracle: the same deltas,
//! applied once and in the order of the versions the gateway assigned, by the library's
//! [`MemoryStore`]. That is exactly-once: no delta applied twice, none lost.
//!
//! The random choices (payloads, run lengths, kill points) come from a seeded generator. The
//! seed is printed; `THREADGATE_TEST_SEED=<seed>` replays the same choices (the timing of a
//! kill relative to the server's work still varies from run to run).

use crate::harness::{Gateway, Process, enc, nats_prefix, nats_url};
use crate::pg::PgSchema;
use crate::support::oracle::Oracle;
use crate::support::post_json;
use crate::support::retry::{Targets, append_retrying};
use crate::support::rng::{Rng, seed};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use threadgate::config::Config;
use threadgate::id::ThreadId;
use threadgate::store::{Change, PostgresStore, Store, Write};

// ---------------------------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------------

/// The create body of every thread here: state that every generated patch applies to, in any
/// order of the deltas.
fn create_body(id: &str) -> Value {
    json!({
        "id": id,
        "resource_id": "crash-suite",
        "state": {"counters": {"steps": 0, "budget": 1_000_000, "f": 0.5}, "log": [], "runs": {}},
        "metadata": {"suite": "crash", "owner": id},
    })
}

/// The deltas of one run: user, assistant (some with tool calls) and tool messages, most
/// with ids, some without, some repeating an id the run already used (the apply rule skips
/// those), internal ones, odd Unicode; patches of most ops; `run_meta` at the start,
/// sometimes in between and at the end; the last delta is `RunFinished`.
fn gen_run(rng: &mut Rng, run_id: &str, len: usize) -> Vec<Value> {
    let mut used_ids: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(len);
    let meta = |status: &str, step: usize| {
        let mut m = json!({"agent_id": "agent-7", "origin": "user", "status": status,
            "input_tokens": 10 * step as u64, "output_tokens": 3 * step as u64});
        if status == "done" {
            m["termination_code"] = "natural".into();
        }
        m
    };
    for step in 0..len {
        let last = step + 1 == len;
        let reason = if last {
            "RunFinished"
        } else if step == 0 {
            "UserMessage"
        } else if rng.one_in(4) {
            "ToolResultsCommitted"
        } else {
            "AssistantTurnCommitted"
        };
        let mut messages = Vec::new();
        let count = if last { rng.below(2) } else { rng.range(1, 2) };
        for k in 0..count {
            let role = match reason {
                "UserMessage" => "user",
                "ToolResultsCommitted" => "tool",
                _ => "assistant",
            };
            let flavour = match rng.below(8) {
                0 => " é✓ 漢字 🚀",
                1 => " nul:\u{0}:",
                2 => " \"quoted\" \\ back",
                _ => "",
            };
            let mut m = json!({
                "role": role,
                "content": format!("{run_id} step {step} msg {k} #{}{flavour}", rng.below(1_000_000)),
                "metadata": {"run_id": run_id, "step_index": step},
            });
            if !rng.one_in(5) {
                let id = format!("{run_id}-s{step}-m{k}");
                m["id"] = id.clone().into();
                used_ids.push(id);
            }
            if role == "tool" {
                m["tool_call_id"] = format!("call-{run_id}-{step}").into();
            }
            if role == "assistant" && rng.one_in(3) {
                m["tool_calls"] = json!([{"id": format!("call-{run_id}-{step}"), "name": "search",
                    "arguments": {"q": format!("step {step}"), "n": step, "deep": {"x": [1, 2.5]}}}]);
            }
            if rng.one_in(6) {
                m["visibility"] = "internal".into();
            }
            messages.push(m);
        }
        if !used_ids.is_empty() && rng.one_in(5) {
            // A message whose id the thread already has: skipped, never duplicated.
            let id = used_ids[rng.below(used_ids.len() as u64) as usize].clone();
            messages.push(json!({"id": id, "role": "assistant", "content": "repeated id"}));
        }
        let mut ops = vec![
            json!({"op": "increment", "path": ["counters", "steps"], "amount": 1}),
            json!({"op": "set", "path": ["runs", run_id, "step"], "value": step}),
        ];
        match rng.below(7) {
            0 => ops.push(json!({"op": "append", "path": ["log"], "value": format!("{run_id}:{step}")})),
            1 => ops.push(json!({"op": "decrement", "path": ["counters", "budget"], "amount": rng.range(1, 9)})),
            2 => ops.push(json!({"op": "increment", "path": ["counters", "f"], "amount": 0.25})),
            3 => ops.push(json!({"op": "insert", "path": ["log"], "index": 0, "value": {"run": run_id, "step": step}})),
            4 => ops.push(json!({"op": "remove", "path": ["log"], "value": format!("{run_id}:{}", step.saturating_sub(1))})),
            5 => ops.push(json!({"op": "merge_object", "path": ["runs", run_id], "value": {"seen": true, "at": step}})),
            _ => ops.push(json!({"op": "delete", "path": ["runs", run_id, "tmp"]})),
        }
        let mut delta = json!({
            "run_id": run_id,
            "reason": reason,
            "messages": messages,
            "patches": [{"patch": {"ops": ops}, "id": format!("p-{run_id}-{step}"), "source": "crash-suite"}],
        });
        if step == 0 {
            delta["run_meta"] = meta("running", step);
            if rng.one_in(3) {
                delta["parent_run_id"] = format!("parent-of-{run_id}").into();
            }
        } else if last {
            delta["run_meta"] = meta("done", step);
        } else if rng.one_in(5) {
            delta["run_meta"] = meta("waiting", step);
        }
        if rng.one_in(6) {
            delta["actions"] = json!([{"state_type_name": "Plan", "base_path": "plan", "scope": "run",
                "call_id_override": null, "payload": {"step": step}}]);
        }
        out.push(delta);
    }
    out
}

/// Sets the flag when the owning task panics, so a waiting controller stops waiting.
struct PanicFlag(Arc<AtomicBool>);

impl Drop for PanicFlag {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// Deltas the gateway acknowledged, per thread, with the version each produced.
type Acked = Arc<Mutex<BTreeMap<String, Vec<(u64, Value)>>>>;

fn record(acked: &Acked, id: &str, version: u64, delta: Value) {
    acked
        .lock()
        .unwrap()
        .entry(id.to_owned())
        .or_default()
        .push((version, delta));
}

// ---------------------------------------------------------------------------------------------
// The oracle
// ---------------------------------------------------------------------------------------------

/// Folds a thread (retrying through crashes) and returns the fold report.
async fn flush_retrying(t: &Targets, replica: usize, id: &str) -> Value {
    let a = t
        .send(
            replica,
            Method::POST,
            &format!("/v1/threads/{}/flush", enc(id)),
            None,
            &[],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "flush {id}: {}", a.body);
    a.body
}

/// Arguments for a buffered gateway process on PostgreSQL.
fn gateway_args(store: &str, prefix: &str, fold_idle: &str) -> Vec<String> {
    [
        "--store",
        store,
        "--nats-url",
        &nats_url(),
        "--nats-prefix",
        prefix,
        "--fold-idle",
        fold_idle,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn spawn(args: &[String]) -> Process {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Process::spawn(&args).await
}

/// SIGKILL, and wait until the process is gone.
async fn kill_9(p: &mut Process) {
    p.child.start_kill().expect("SIGKILL");
    p.child.wait().await.expect("reaped");
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 at random points during 50 runs over 10 threads
// ---------------------------------------------------------------------------------------------

const CRASH_THREADS: [&str; 10] = [
    "a.b", "x*y", "p>q", "plain-0", "plain-1", "plain-2", "plain-3", "plain-4", "plain-5",
    "plain-6",
];

/// A controller kills the gateway with SIGKILL 8 to 12 times during 50 runs (some kills
/// while a RunFinished is folding), restarts it on the same NATS, PostgreSQL and prefix;
/// clients retry with the same `Idempotency-Key` until answered. Every final thread must be
/// exactly the oracle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_50_runs_loses_nothing_and_applies_nothing_twice() {
    let mut rng = seed("crash");
    let schema = PgSchema::create().await;
    let prefix = nats_prefix();
    let args = gateway_args(&schema.url(), &prefix, "1s");
    let mut proc = spawn(&args).await;
    let targets = Targets::new(vec![proc.base()]);
    let oracle = Oracle::new();
    for id in CRASH_THREADS {
        let body = create_body(id);
        post_json(&targets.http, &proc.base(), "/v1/threads", &body).await;
        oracle.create(&body).await;
    }

    // 50 runs spread over the threads; each thread's runs follow one another, as one agent's.
    // Between runs an agent pauses; some pauses outlast --fold-idle, so the idle sweeper
    // folds (and gets killed) too.
    let mut plan: Vec<Vec<(Duration, Vec<Value>)>> = vec![Vec::new(); CRASH_THREADS.len()];
    for run in 0..50 {
        let thread = run % CRASH_THREADS.len();
        let len = rng.range(2, 20) as usize;
        let pause = if rng.one_in(4) {
            rng.range(1_100, 1_400)
        } else {
            rng.below(40)
        };
        plan[thread].push((
            Duration::from_millis(pause),
            gen_run(&mut rng, &format!("run-{run}"), len),
        ));
    }
    let total: u64 = plan.iter().flatten().map(|(_, r)| r.len() as u64).sum();

    let acked: Acked = Default::default();
    let progress = Arc::new(AtomicU64::new(0));
    let finishing = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(AtomicU64::new(0));
    let replays = Arc::new(AtomicU64::new(0));
    let unflushed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for (ti, runs) in plan.into_iter().enumerate() {
        let (t, acked, progress, finishing) = (
            targets.clone(),
            acked.clone(),
            progress.clone(),
            finishing.clone(),
        );
        let (failed, retried, replays, unflushed) = (
            failed.clone(),
            retried.clone(),
            replays.clone(),
            unflushed.clone(),
        );
        clients.push(tokio::spawn(async move {
            let _flag = PanicFlag(failed);
            let id = CRASH_THREADS[ti];
            for (ri, (pause, run)) in runs.into_iter().enumerate() {
                tokio::time::sleep(pause).await;
                for (si, delta) in run.into_iter().enumerate() {
                    let finished = delta["reason"] == "RunFinished";
                    if finished {
                        finishing.fetch_add(1, Ordering::SeqCst);
                    }
                    let key = format!("{id}/{ri}/{si}");
                    let a = append_retrying(&t, 0, id, &key, &delta, None).await;
                    if finished {
                        finishing.fetch_sub(1, Ordering::SeqCst);
                        if a.body["flushed"] != true {
                            unflushed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    assert_eq!(a.status, StatusCode::OK, "append {key} to {id}: {}", a.body);
                    retried.fetch_add(a.retries as u64, Ordering::Relaxed);
                    replays.fetch_add(a.replayed as u64, Ordering::Relaxed);
                    let version = a.body["version"].as_u64().expect("version");
                    record(&acked, id, version, delta);
                    progress.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }

    // The controller: kill points spread over the whole workload.
    let kills = rng.range(8, 12) as usize;
    let mut points: Vec<u64> = Vec::new();
    while points.len() < kills {
        let p = rng.range(total / 20, total * 9 / 10);
        if !points.contains(&p) {
            points.push(p);
        }
    }
    points.sort();
    let started = Instant::now();
    let mut done_kills = 0;
    let mut while_folding = 0;
    for (k, point) in points.iter().enumerate() {
        while progress.load(Ordering::SeqCst) < *point && !failed.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if failed.load(Ordering::SeqCst) {
            break;
        }
        // Every other kill aims at a RunFinished in flight (its fold, or just after it).
        if k % 2 == 1 {
            let until = Instant::now() + Duration::from_secs(2);
            while finishing.load(Ordering::SeqCst) == 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if finishing.load(Ordering::SeqCst) > 0 {
                while_folding += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(15))).await;
        kill_9(&mut proc).await;
        done_kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.below(150))).await;
        proc = spawn(&args).await;
        targets.set(0, proc.base());
    }
    for c in clients {
        c.await.expect("client");
    }
    assert_eq!(done_kills, kills, "every planned kill happened");
    eprintln!(
        "crash: {total} deltas in 50 runs over {} threads, {kills} kills ({while_folding} aimed at \
         a RunFinished in flight), {} retried attempts, {} idempotent replays, {} RunFinished \
         answered before their fold completed, {:.1?}",
        CRASH_THREADS.len(),
        retried.load(Ordering::Relaxed),
        replays.load(Ordering::Relaxed),
        unflushed.load(Ordering::Relaxed),
        started.elapsed()
    );

    // Fold everything, then compare every thread with the oracle.
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    for id in CRASH_THREADS {
        let n = oracle
            .apply(id, acked.get(id).cloned().unwrap_or_default())
            .await;
        let report = flush_retrying(&targets, 0, id).await;
        assert_eq!(report["version"], n, "thread {id}: fold report {report}");
        oracle.assert_matches(&targets.http, &proc.base(), id).await;
    }
    proc.terminate().await;
    crate::harness::drop_streams(&nats_url(), &prefix).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Two replicas on one NATS and one PostgreSQL
// ---------------------------------------------------------------------------------------------

const FREE_THREADS: [&str; 4] = ["r.1", "r*2", "r>3", "r-4"];
const CAS_THREADS: [&str; 2] = ["c.1", "c>2"];

/// Two gateway processes: appends spread over both (clients fail over with the same
/// `Idempotency-Key` while one restarts), folds on both at once racing the appends,
/// recoveries (kill -9 or SIGTERM of one, then restart) racing both, and `If-Match` races
/// throughout: of two appends with the same expected version on different replicas exactly
/// one lands. Every thread, read from either replica, must be exactly the oracle's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_with_racing_folds_and_restarts_match_the_oracle() {
    let mut rng = seed("replicas");
    let schema = PgSchema::create().await;
    let prefix = nats_prefix();
    let args = gateway_args(&schema.url(), &prefix, "1s");
    let procs = vec![spawn(&args).await, spawn(&args).await];
    let targets = Targets::new(procs.iter().map(Process::base).collect());
    let oracle = Oracle::new();
    for (i, id) in FREE_THREADS.iter().chain(&CAS_THREADS).enumerate() {
        let body = create_body(id);
        post_json(&targets.http, &targets.base(i % 2), "/v1/threads", &body).await;
        oracle.create(&body).await;
    }
    let all: Vec<&'static str> = FREE_THREADS.iter().chain(&CAS_THREADS).copied().collect();

    // Flushers: both replicas fold the same thread at once, over and over.
    let stop_flushing = Arc::new(AtomicBool::new(false));
    let flushes = Arc::new(AtomicU64::new(0));
    let flusher = {
        let (t, stop, flushes, all) = (
            targets.clone(),
            stop_flushing.clone(),
            flushes.clone(),
            all.clone(),
        );
        let mut rng = Rng(rng.next_u64());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let id = all[rng.below(all.len() as u64) as usize];
                let path = format!("/v1/threads/{}/flush", enc(id));
                let (a, b) = tokio::join!(
                    t.try_once(0, Method::POST, &path),
                    t.try_once(1, Method::POST, &path)
                );
                for ans in [a, b].into_iter().flatten() {
                    assert_eq!(ans.status, StatusCode::OK, "flush {id}: {}", ans.body);
                    flushes.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
            }
        })
    };

    // Two writers per thread, one starting on each replica; each writes runs (a
    // few milliseconds between deltas) until every restart is done, at least two.
    let acked: Acked = Default::default();
    let failed = Arc::new(AtomicBool::new(false));
    let retried = Arc::new(AtomicU64::new(0));
    let restarting = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for id in FREE_THREADS {
        for w in 0..2usize {
            let mut rng = Rng(rng.next_u64());
            let (t, acked, failed, retried, restarting) = (
                targets.clone(),
                acked.clone(),
                failed.clone(),
                retried.clone(),
                restarting.clone(),
            );
            writers.push(tokio::spawn(async move {
                let _flag = PanicFlag(failed);
                let mut r = 0;
                while r < 2 || (restarting.load(Ordering::SeqCst) && r < 100) {
                    let len = rng.range(4, 12) as usize;
                    let run = gen_run(&mut rng, &format!("{id}-w{w}-r{r}"), len);
                    for (si, delta) in run.into_iter().enumerate() {
                        let key = format!("{id}/w{w}/{r}/{si}");
                        let a = append_retrying(&t, w, id, &key, &delta, None).await;
                        assert_eq!(a.status, StatusCode::OK, "append {key}: {}", a.body);
                        retried.fetch_add(a.retries as u64, Ordering::Relaxed);
                        record(&acked, id, a.body["version"].as_u64().unwrap(), delta);
                        tokio::time::sleep(Duration::from_millis(rng.below(8))).await;
                    }
                    r += 1;
                }
            }));
        }
    }

    // If-Match races on other threads, through the same restarts: of two appends with the
    // same expected version on different replicas exactly one lands, retries included (a
    // retried winner is replayed, a retried loser still loses).
    let mut racers = Vec::new();
    for id in CAS_THREADS {
        let mut rng = Rng(rng.next_u64());
        let (t, acked, failed, restarting) = (
            targets.clone(),
            acked.clone(),
            failed.clone(),
            restarting.clone(),
        );
        racers.push(tokio::spawn(async move {
            let _flag = PanicFlag(failed);
            let mut r = 0;
            while r < 15 || (restarting.load(Ordering::SeqCst) && r < 500) {
                let mut da = gen_run(&mut rng, &format!("{id}-a{r}"), 1).remove(0);
                let mut db = gen_run(&mut rng, &format!("{id}-b{r}"), 1).remove(0);
                da["reason"] = "AssistantTurnCommitted".into();
                db["reason"] = "AssistantTurnCommitted".into();
                let head = t
                    .send(
                        r % 2,
                        Method::GET,
                        &format!("/v1/threads/{}?view=live", enc(id)),
                        None,
                        &[],
                    )
                    .await;
                let v = head.body["version"].as_u64().unwrap();
                let (ka, kb) = (format!("{id}/a{r}"), format!("{id}/b{r}"));
                let (ra, rb) = tokio::join!(
                    append_retrying(&t, 0, id, &ka, &da, Some(v)),
                    append_retrying(&t, 1, id, &kb, &db, Some(v))
                );
                let statuses = (ra.status, rb.status);
                let winner = match statuses {
                    (StatusCode::OK, StatusCode::PRECONDITION_FAILED) => (ra, da),
                    (StatusCode::PRECONDITION_FAILED, StatusCode::OK) => (rb, db),
                    _ => panic!(
                        "{id} round {r}: If-Match \"{v}\" on both replicas answered {statuses:?} \
                         ({} / {}); exactly one must win",
                        ra.body, rb.body
                    ),
                };
                assert_eq!(winner.0.body["version"], v + 1, "{id} round {r}");
                record(&acked, id, v + 1, winner.1);
                r += 1;
            }
            r
        }));
    }

    // Recoveries racing the appends and folds: one replica at a time goes down and comes
    // back (its start-up recovery folds whatever is buffered, while the other folds too).
    let mut procs = procs;
    let mut restarts = 0;
    for (victim, graceful) in [
        (1usize, false),
        (0, false),
        (1, true),
        (0, false),
        (1, false),
    ] {
        tokio::time::sleep(Duration::from_millis(rng.range(100, 400))).await;
        if failed.load(Ordering::SeqCst) {
            break;
        }
        if graceful {
            procs[victim].terminate().await;
        } else {
            kill_9(&mut procs[victim]).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(200))).await;
        procs[victim] = spawn(&args).await;
        targets.set(victim, procs[victim].base());
        restarts += 1;
    }
    restarting.store(false, Ordering::SeqCst);
    for w in writers {
        w.await.expect("writer");
    }
    let mut cas_rounds = 0;
    for r in racers {
        cas_rounds += r.await.expect("racer");
    }
    assert_eq!(restarts, 5, "every restart happened while the writers ran");
    stop_flushing.store(true, Ordering::SeqCst);
    flusher.await.expect("flusher");

    // Final folds on both replicas at once; then both must serve the oracle's threads.
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    for id in &all {
        let n = oracle
            .apply(id, acked.get(*id).cloned().unwrap_or_default())
            .await;
        let (a, b) = tokio::join!(
            flush_retrying(&targets, 0, id),
            flush_retrying(&targets, 1, id)
        );
        assert_eq!(a["version"], n, "thread {id}: fold report on replica 0");
        assert_eq!(b["version"], n, "thread {id}: fold report on replica 1");
        for replica in 0..2 {
            oracle
                .assert_matches(&targets.http, &targets.base(replica), id)
                .await;
        }
    }
    eprintln!(
        "replicas: {} deltas, {cas_rounds} If-Match races, {restarts} restarts, {} folds \
         raced, {} retried attempts",
        acked.values().map(Vec::len).sum::<usize>(),
        flushes.load(Ordering::Relaxed),
        retried.load(Ordering::Relaxed)
    );
    for p in &mut procs {
        p.terminate().await;
    }
    crate::harness::drop_streams(&nats_url(), &prefix).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Faults 8, 1 and 5
// ---------------------------------------------------------------------------------------------

/// A buffered gateway (in-process) on a fresh PostgreSQL schema with its own prefix.
async fn pg_gateway(fold_idle: Duration) -> (Gateway, String) {
    let schema = PgSchema::create().await;
    let prefix = nats_prefix();
    let mut c = Config::for_tests(&schema.url());
    c.nats_url = Some(nats_url());
    c.nats_prefix = prefix.clone();
    c.fold_idle = fold_idle;
    (Gateway::start_config(c, None, Some(schema)).await, prefix)
}

/// Fault 8: a run of `n` deltas, appended through the HTTP API with `in_flight` requests at
/// a time, folds completely: every message present, in version order, nothing cut at the
/// server's max-ack-pending.
async fn long_run_folds_completely(n: u64, in_flight: usize) {
    use futures::StreamExt;
    let (gw, prefix) = pg_gateway(Duration::from_secs(3600)).await;
    gw.create(json!({"id": "long.run", "state": {"n": 0}}))
        .await;
    let started = Instant::now();
    let path = format!("/v1/threads/{}/deltas", enc("long.run"));
    let t = Targets::new(vec![gw.base.clone()]);
    let retried = AtomicU64::new(0);
    let mut by_version: Vec<(u64, u64)> = futures::stream::iter(0..n)
        .map(|i| {
            let (t, retried) = (&t, &retried);
            async move {
                let delta = json!({"run_id": "long", "reason": "AssistantTurnCommitted",
                    "messages": [{"id": format!("m{i}"), "role": "assistant", "content": i.to_string()}],
                    "patches": [{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}]});
                let a = append_retrying(t, 0, "long.run", &format!("k{i}"), &delta, None).await;
                assert_eq!(a.status, StatusCode::OK, "append {i}: {}", a.body);
                retried.fetch_add(a.retries as u64, Ordering::Relaxed);
                (a.body["version"].as_u64().unwrap(), i)
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    let appended = started.elapsed();
    let finish = gw
        .post(
            &path,
            &json!({"run_id": "long", "reason": "RunFinished", "messages": [], "patches": []}),
        )
        .await;
    assert_eq!(finish.status(), StatusCode::OK);
    let finish: Value = finish.json().await.unwrap();
    assert_eq!(finish["version"], n + 1);
    // A fold this long may outlast RunFinished's wait ("flushed": false); then the flush
    // below completes it.
    let report = post_json(
        &gw.http,
        &gw.base,
        &format!("/v1/threads/{}/flush", enc("long.run")),
        &json!({}),
    )
    .await;
    assert_eq!(report["version"], n + 1, "fold report {report}");
    let folded = started.elapsed() - appended;

    by_version.sort();
    let versions: Vec<u64> = by_version.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (1..=n).collect::<Vec<_>>(), "versions 1..={n}");
    let t = gw.get_json("/v1/threads/long.run").await;
    assert_eq!(t["version"], n + 1);
    let messages = t["messages"].as_array().unwrap();
    assert_eq!(messages.len() as u64, n, "every delta's message was folded");
    for (cursor, (m, (_, i))) in messages.iter().zip(&by_version).enumerate() {
        assert_eq!(
            m["content"],
            i.to_string(),
            "message at cursor {cursor} is the delta with version {}",
            cursor + 1
        );
    }
    assert_eq!(
        gw.get_json("/v1/threads/long.run/state").await["state"],
        json!({"n": n})
    );
    eprintln!(
        "long run: {n} deltas appended ({in_flight} in flight, {} attempts answered 503 and \
         were retried) in {appended:.1?}; RunFinished (flushed: {}) + flush in {folded:.1?}",
        retried.load(Ordering::Relaxed),
        finish["flushed"]
    );
    gw.stop().await;
    crate::harness::drop_streams(&nats_url(), &prefix).await;
}

/// About a minute on the 2-core development machine (30 s of appends, 30 s of folding).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_of_100_000_deltas_folds_completely() {
    long_run_folds_completely(100_000, 32).await;
}

/// Fault 1: RunFinished answers `"flushed": true` once the store has the run, for runs of 1,
/// 10 and 100 deltas, so the default (store) view already shows it: no idle wait, no polling.
#[tokio::test]
async fn run_finished_answers_once_the_store_has_the_run() {
    let (gw, prefix) = pg_gateway(Duration::from_secs(3600)).await;
    for (i, len) in [1usize, 10, 100].into_iter().enumerate() {
        let id = format!("fin.{len}");
        gw.create(json!({"id": id})).await;
        // A previous, already folded run on the same thread.
        let earlier = post_json(
            &gw.http,
            &gw.base,
            &format!("/v1/threads/{}/deltas", enc(&id)),
            &json!({"run_id": "earlier", "reason": "RunFinished",
                "messages": [{"role": "user", "content": "hi"}], "patches": []}),
        )
        .await;
        assert_eq!(earlier, json!({"version": 1, "flushed": true}));
        let meta = |status: &str| {
            json!({"agent_id": "a", "origin": "user", "status": status,
                "input_tokens": 1, "output_tokens": 2})
        };
        let run = format!("run-{i}");
        for step in 0..len {
            let last = step + 1 == len;
            let mut d = json!({"run_id": run,
                "reason": if last { "RunFinished" } else { "AssistantTurnCommitted" },
                "messages": [{"id": format!("m{step}"), "role": "assistant", "content": format!("step {step}")}],
                "patches": []});
            if step == 0 {
                d["run_meta"] = meta("running");
            }
            if last {
                d["run_meta"] = meta("done");
            }
            let a = post_json(
                &gw.http,
                &gw.base,
                &format!("/v1/threads/{}/deltas", enc(&id)),
                &d,
            )
            .await;
            let version = 2 + step as u64;
            if last {
                assert_eq!(
                    a,
                    json!({"version": version, "flushed": true}),
                    "run of {len}"
                );
            } else {
                assert_eq!(a, json!({"version": version}), "run of {len}");
            }
        }
        // Immediately after the answer: the default view is the store's.
        let v = 1 + len as u64;
        let t = gw.get_json(&format!("/v1/threads/{}", enc(&id))).await;
        assert_eq!(t["version"], v, "run of {len}: the store has the whole run");
        assert_eq!(t["messages"].as_array().unwrap().len(), 1 + len);
        assert_eq!(t["messages"][len]["content"], format!("step {}", len - 1));
        let r = gw
            .get_json(&format!("/v1/threads/{}/runs/{run}", enc(&id)))
            .await;
        assert_eq!(r["meta"]["status"], "done", "run of {len}: {r}");
        assert_eq!(r["version"], v);
    }
    gw.stop().await;
    crate::harness::drop_streams(&nats_url(), &prefix).await;
}

/// Fault 5: a crash between the store commit and the log trim leaves folded entries in the
/// log; folding them again (flush, flush again, a restart's recovery, two processes at once)
/// applies nothing twice. The crash is made exact by committing part of the log to the store
/// directly, as a fold that died before its trim would have, before the gateway folds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_a_folded_log_applies_nothing_twice() {
    let schema = PgSchema::create().await;
    let prefix = nats_prefix();
    let args = gateway_args(&schema.url(), &prefix, "1h");
    let mut proc = spawn(&args).await;
    let http = reqwest::Client::new();
    let id = "re.play*";
    let tid = ThreadId::parse(id).unwrap();
    let body = json!({"id": id, "state": {"n": 0, "log": []}});
    post_json(&http, &proc.base(), "/v1/threads", &body).await;
    let oracle = Oracle::new();
    oracle.create(&body).await;

    // Messages without ids and increments: a second application would show.
    let deltas: Vec<Value> = (0..12)
        .map(|i| {
            json!({"run_id": "r", "reason": "AssistantTurnCommitted",
                "messages": [{"role": "assistant", "content": format!("d{i}")}],
                "patches": [{"patch": {"ops": [
                    {"op": "increment", "path": ["n"], "amount": 1},
                    {"op": "append", "path": ["log"], "value": i}]}}]})
        })
        .collect();
    let path = format!("/v1/threads/{}/deltas", enc(id));
    let mut acked = Vec::new();
    for d in &deltas {
        let a = post_json(&http, &proc.base(), &path, d).await;
        acked.push((a["version"].as_u64().unwrap(), d.clone()));
    }
    let n = oracle.apply(id, acked).await;

    // "The fold committed the first 5 entries, then the process died before trimming."
    let store = PostgresStore::connect(&schema.url()).await.unwrap();
    let committed: Vec<Write> = deltas[..5]
        .iter()
        .enumerate()
        .map(|(i, d)| Write {
            version: i as u64 + 1,
            at: 0,
            change: Change::Delta(serde_json::from_value(d.clone()).unwrap()),
            idempotency: None,
        })
        .collect();
    assert_eq!(store.apply_batch(&tid, committed.clone()).await.unwrap(), 5);
    kill_9(&mut proc).await;

    // Recovery at start-up, a flush racing it, and flushes after it: each sees the whole
    // log (nothing was trimmed) and must apply only what is above the watermark.
    proc = spawn(&args).await;
    let flush_path = format!("/v1/threads/{}/flush", enc(id));
    let report = post_json(&http, &proc.base(), &flush_path, &json!({})).await;
    assert_eq!(report["version"], n, "{report}");
    oracle.assert_matches(&http, &proc.base(), id).await;
    let again = post_json(&http, &proc.base(), &flush_path, &json!({})).await;
    assert_eq!(again, json!({"version": n, "applied": 0}));

    // The folded entries are still in the log (inside the duplicate window), so the replays
    // below really have something to apply twice if the watermark failed.
    let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let mut stream = js.get_stream(format!("{prefix}_log")).await.unwrap();
    let buffered = stream.info().await.unwrap().state.messages;
    assert!(
        buffered >= n,
        "the log still holds the folded entries: {buffered}"
    );

    // kill -9 and restart twice over, two processes recovering the same log at once.
    kill_9(&mut proc).await;
    let (mut p1, mut p2) = (spawn(&args).await, spawn(&args).await);
    let (b1, b2, empty) = (p1.base(), p2.base(), json!({}));
    let (a, b) = tokio::join!(
        post_json(&http, &b1, &flush_path, &empty),
        post_json(&http, &b2, &flush_path, &empty)
    );
    assert_eq!((&a["version"], &b["version"]), (&json!(n), &json!(n)));
    assert_eq!(a["applied"], 0, "{a}");
    assert_eq!(b["applied"], 0, "{b}");
    oracle.assert_matches(&http, &p1.base(), id).await;
    oracle.assert_matches(&http, &p2.base(), id).await;
    assert_eq!(store.version(&tid).await.unwrap(), n);
    kill_9(&mut p1).await;
    p2.terminate().await;
    drop(store);
    crate::harness::drop_streams(&nats_url(), &prefix).await;
}

/// A conditional append whose answer was lost (gateway killed, timeout) is retried by the
/// client with the same `If-Match` and `Idempotency-Key`: like in direct mode, the retry
/// must answer the first result (200, `Idempotent-Replayed`), not 412, or the client
/// concludes it lost a race its write actually won.
#[tokio::test]
async fn conditional_retry_of_a_landed_append_is_replayed() {
    let (gw, prefix) = pg_gateway(Duration::from_secs(3600)).await;
    gw.create(json!({"id": "t"})).await;
    let send = || {
        gw.http
            .post(gw.url("/v1/threads/t/deltas"))
            .header("if-match", "\"0\"")
            .header("idempotency-key", "k1")
            .json(&crate::harness::delta_msg("r", Some("m1"), "x"))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    for when in ["while buffered", "after the fold"] {
        let retry = send().await.unwrap();
        assert_eq!(retry.status(), StatusCode::OK, "retry {when}");
        assert_eq!(
            retry.headers()["idempotent-replayed"],
            "true",
            "retry {when}"
        );
        assert_eq!(retry.json::<Value>().await.unwrap()["version"], 1);
        post_json(&gw.http, &gw.base, "/v1/threads/t/flush", &json!({})).await;
    }
    assert_eq!(gw.get_json("/v1/threads/t").await["version"], 1);
    gw.stop().await;
    crate::harness::drop_streams(&nats_url(), &prefix).await;
}
