//! Connection hygiene over raw TCP: the header-read timeout cuts off slow-header clients while
//! others are served, idle keep-alive connections are closed, an SSE stream outlives the idle
//! timeout, a body that does not arrive is answered `408`, a client that stops reading is let
//! go, and connections beyond the cap wait until a slot frees (the real binary under a low
//! open-files limit never runs out of descriptors).
//!
//! Time bounds here are deadlines of the server under test; assertions check that a connection
//! is *not* closed before its deadline and *is* closed within a generous margin after it.

use crate::harness::{Backend, Gateway, delta_msg};
use reqwest::StatusCode;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Margin for "closed soon after its deadline" on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(5);

async fn connect(addr: &str) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

fn addr(gw: &Gateway) -> String {
    gw.base.trim_start_matches("http://").to_owned()
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; returns (status, body).
async fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.expect("read head");
        assert!(n == 1, "connection closed inside a response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.expect("read body");
    (status, String::from_utf8(body).unwrap())
}

async fn get_on(s: &mut TcpStream, path: &str) -> (u16, String) {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_response(s).await
}

/// Waits until the server closes `s` (EOF or reset), reading and discarding anything it sends.
/// Returns how long that took, or `None` if it is still open after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

#[tokio::test]
async fn slow_header_clients_are_cut_off_while_others_are_served() {
    let timeout = Duration::from_secs(1);
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.header_read_timeout = timeout;
        c.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let a = addr(&gw);
    // 50 clients that dribble a head one byte every 100 ms, forever, and one that sends
    // nothing at all after connecting.
    let mut dribblers = Vec::new();
    for i in 0..50 {
        let mut s = connect(&a).await;
        dribblers.push(tokio::spawn(async move {
            let head = format!("GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow-{i}: ");
            let t0 = Instant::now();
            for b in head.bytes().chain(std::iter::repeat(b'a')) {
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                // A closed connection shows up as a read of 0 (or a write error).
                let mut probe = [0u8; 1];
                if let Ok(r) =
                    tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
                {
                    match r {
                        Ok(0) | Err(_) => break,
                        Ok(_) => panic!("a dribbling client got an answer"),
                    }
                }
                if t0.elapsed() > timeout + SLACK {
                    return None;
                }
            }
            Some(t0.elapsed())
        }));
    }
    let silent_since = Instant::now();
    let mut silent = connect(&a).await;
    // Meanwhile other clients are served promptly, on fresh and on kept-alive connections.
    let mut kept = connect(&a).await;
    for _ in 0..5 {
        assert_eq!(gw.get_json("/healthz").await["status"], "ok");
        let (status, _) = get_on(&mut kept, "/healthz").await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for d in dribblers {
        let took = d
            .await
            .unwrap()
            .expect("a dribbling client was never cut off");
        assert!(
            took >= timeout - Duration::from_millis(150),
            "cut off after {took:?}, before the {timeout:?} timeout"
        );
    }
    closed_within(&mut silent, timeout + SLACK)
        .await
        .expect("a connection that sends nothing is cut off too");
    assert!(
        silent_since.elapsed() >= timeout - Duration::from_millis(150),
        "the silent client was cut off before the timeout"
    );
    // The kept-alive client was busy every 100 ms and is still served.
    let (status, _) = get_on(&mut kept, "/healthz").await;
    assert_eq!(status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let idle = Duration::from_secs(1);
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.idle_timeout = idle;
        c.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let a = addr(&gw);
    // Busy every 300 ms for 3 s: never idle for 1 s, so it stays open throughout.
    let mut busy = connect(&a).await;
    for _ in 0..10 {
        assert_eq!(get_on(&mut busy, "/healthz").await.0, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(get_on(&mut busy, "/healthz").await.0, 200);
    // Then quiet: closed after the idle timeout, not before.
    let took = closed_within(&mut busy, idle + SLACK)
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(
        took >= idle - Duration::from_millis(100),
        "closed after {took:?}"
    );
    // The idle timeout (1 s), not the header-read timeout (30 s), applies between requests.
    let mut other = connect(&a).await;
    assert_eq!(get_on(&mut other, "/readyz").await.0, 200);
    assert!(closed_within(&mut other, idle + SLACK).await.is_some());
    gw.stop().await;
}

#[tokio::test]
async fn an_sse_stream_outlives_the_idle_timeout() {
    let idle = Duration::from_millis(500);
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.idle_timeout = idle;
        // No keep-alive comment during the test: the stream is quiet for longer than `idle`.
        c.sse_keepalive = Duration::from_secs(60);
    })
    .await;
    gw.create(json!({"id": "t"})).await;
    let mut s = connect(&addr(&gw)).await;
    s.write_all(b"GET /v1/threads/t/events?after=0 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut lines = BufReader::new(s).lines();
    let status = lines.next_line().await.unwrap().unwrap();
    assert!(status.contains("200"), "{status}");
    tokio::time::sleep(idle * 4).await;
    gw.append("t", delta_msg("r", None, "still here")).await;
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.contains("still here") {
                return true;
            }
        }
        false
    })
    .await
    .expect("the event arrives");
    assert!(got, "the stream ended before the event");
    gw.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_is_answered_408() {
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.body_read_timeout = Duration::from_secs(1);
    })
    .await;
    gw.create(json!({"id": "t"})).await;
    let mut s = connect(&addr(&gw)).await;
    s.write_all(
        b"POST /v1/threads/t/deltas HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"run_id\":",
    )
    .await
    .unwrap();
    let start = Instant::now();
    let (status, body) = tokio::time::timeout(SLACK * 2, read_response(&mut s))
        .await
        .expect("an answer");
    assert_eq!(status, 408, "{body}");
    assert!(start.elapsed() >= Duration::from_millis(900));
    let p: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(p["code"], "request_timeout");
    assert_eq!(
        gw.get_json("/v1/threads/t").await["version"],
        0,
        "nothing appended"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_let_go() {
    let idle = Duration::from_secs(1);
    let gw = Gateway::start_with(Backend::Memory, |c| {
        c.idle_timeout = idle;
        c.max_body = 16 << 20;
    })
    .await;
    // A 12 MB state: far more than the socket buffers on both sides hold.
    let big = "x".repeat(12 << 20);
    gw.create(json!({"id": "t", "state": {"big": big}})).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(addr(&gw).parse().unwrap()).await.unwrap();
    s.write_all(b"GET /v1/threads/t/state HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    // Never read for a while: the server's write stalls, and after the idle timeout it gives up.
    tokio::time::sleep(idle + Duration::from_secs(2)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await
    .expect("the connection ends");
    assert!(
        got < 12 << 20,
        "the whole response ({got} bytes) was delivered: the stalled connection was kept"
    );
    // The gateway is fine.
    assert_eq!(gw.get_json("/healthz").await["status"], "ok");
    gw.stop().await;
}

/// The binary under `ulimit -n <nofile>` with `args`; its log lines are collected.
struct Limited {
    child: tokio::process::Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Limited {
    async fn spawn(nofile: u32, args: &[&str]) -> Limited {
        let mut child = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_threadgate"))
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("bash and the binary start");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                log.lock().unwrap().push(line.clone());
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["fields"]["message"] == "threadgate listening" {
                    return v["fields"]["addr"].as_str().unwrap().to_owned();
                }
            }
            panic!(
                "threadgate exited before listening: {:?}",
                log.lock().unwrap()
            );
        })
        .await
        .expect("listens within 30 s");
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                sink.lock().unwrap().push(l);
            }
        });
        Limited { child, addr, log }
    }

    fn open_fds(&self) -> usize {
        let pid = self.child.id().expect("running");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    }
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_for_a_slot_and_descriptors_never_run_out() {
    const NOFILE: u32 = 64;
    const CAP: usize = 16;
    let gw = Limited::spawn(
        NOFILE,
        &[
            "--store",
            "memory:",
            "--max-connections",
            &CAP.to_string(),
            "--header-read-timeout",
            "60s",
            "--idle-timeout",
            "60s",
        ],
    )
    .await;
    // Fill every slot with a served keep-alive connection.
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut s = connect(&gw.addr).await;
        assert_eq!(get_on(&mut s, "/healthz").await.0, 200);
        held.push(s);
    }
    // The next client connects (the kernel's backlog holds it) but is not served...
    let mut waiting = connect(&gw.addr).await;
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiting.peek(&mut first))
            .await
            .is_err(),
        "a connection beyond the cap was served"
    );
    // ...until a slot frees.
    drop(held.pop());
    let (status, _) = tokio::time::timeout(SLACK, read_response(&mut waiting))
        .await
        .expect("served once a slot freed");
    assert_eq!(status, 200);
    held.push(waiting);

    // Far more connections than the process has descriptors: they queue, nothing breaks.
    // (100: within the listen backlog of 128, beyond which the kernel makes clients retry
    // their SYN, which is slow but just as harmless.)
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(connect(&gw.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds = gw.open_fds();
    assert!(
        fds < NOFILE as usize,
        "{fds} descriptors open under a limit of {NOFILE}"
    );
    // Let everything go; the gateway then serves normally.
    drop(held);
    drop(flood);
    let http = reqwest::Client::new();
    let res = tokio::time::timeout(
        SLACK * 4,
        http.get(format!("http://{}/healthz", gw.addr)).send(),
    )
    .await
    .expect("served after the flood")
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let log = gw.log.lock().unwrap().join("\n");
    assert!(
        !log.contains("Too many open files") && !log.contains("accept failed"),
        "the gateway ran out of descriptors:\n{log}"
    );
    // A clean SIGTERM still works with connections around.
    let mut gw = gw;
    let _lingering = connect(&gw.addr).await;
    let pid = gw.child.id().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), gw.child.wait())
        .await
        .expect("exits within 10 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}
