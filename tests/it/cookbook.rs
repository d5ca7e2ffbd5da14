//! Runs the README's curl cookbook against freshly started binaries, so it cannot drift.
//!
//! Fenced blocks the test reads (all run in order, in one temporary working directory):
//!
//! - ```` ```sh cookbook ```` (or ```` ```sh cookbook <gateway> ````): commands, split on lines
//!   (joining `\` continuations); a following `# => text` line says what the command's output
//!   must contain. Each runs in `bash -c` with `http://localhost:8080` pointed at the gateway
//!   the block names (`default` when it names none: the binary with a file store).
//! - ```` ```text cookbook-file <name> ````: a file the examples use (a tokens file), written
//!   into the working directory before any gateway starts.
//! - ```` ```sh cookbook-gateway <gateway> ````: how a named gateway is started, as a user
//!   would type it: `[VAR=value ...] cargo run --release -- <flags>`; the test starts the
//!   binary with those flags and variables (on a free port) before that gateway's first
//!   example.

use crate::harness::Process;
use std::collections::HashMap;

struct Example {
    gateway: String,
    command: String,
    expect: Vec<String>,
}

#[derive(Default)]
struct Cookbook {
    examples: Vec<Example>,
    files: Vec<(String, String)>,
    /// Gateway name -> its start-up command line.
    gateways: HashMap<String, String>,
}

enum Block {
    Commands(String),
    File(String),
    Gateway(String),
}

fn cookbook(readme: &str) -> Cookbook {
    let mut out = Cookbook::default();
    let mut block: Option<(Block, String)> = None;
    let mut pending = String::new();
    for line in readme.lines() {
        let Some((kind, text)) = &mut block else {
            let info: Vec<&str> = line.split_whitespace().collect();
            let name = |i: usize| info.get(i).map_or("default", |n| n).to_owned();
            block = match info.as_slice() {
                ["```sh", "cookbook", ..] => Some((Block::Commands(name(2)), String::new())),
                ["```text", "cookbook-file", file] => {
                    Some((Block::File(file.to_string()), String::new()))
                }
                ["```sh", "cookbook-gateway", ..] => Some((Block::Gateway(name(2)), String::new())),
                _ => None,
            };
            continue;
        };
        if line.trim() == "```" {
            match block.take() {
                Some((Block::File(name), text)) => out.files.push((name, text)),
                Some((Block::Gateway(name), text)) => {
                    let command = text.trim().replace("\\\n", " ");
                    assert!(
                        out.gateways.insert(name.clone(), command).is_none(),
                        "gateway {name} is started twice"
                    );
                }
                _ => {}
            }
            continue;
        }
        match kind {
            Block::File(_) | Block::Gateway(_) => {
                text.push_str(line);
                text.push('\n');
            }
            Block::Commands(gateway) => {
                if let Some(expect) = line.strip_prefix("# => ") {
                    out.examples
                        .last_mut()
                        .expect("an expectation follows a command")
                        .expect
                        .push(expect.to_owned());
                } else if line.starts_with('#') || line.trim().is_empty() {
                    continue;
                } else if let Some(start) = line.strip_suffix('\\') {
                    pending.push_str(start);
                } else {
                    pending.push_str(line);
                    out.examples.push(Example {
                        gateway: gateway.clone(),
                        command: std::mem::take(&mut pending),
                        expect: Vec::new(),
                    });
                }
            }
        }
    }
    out
}

/// Starts a gateway from its README command line (`[VAR=value ...] cargo run --release --
/// <flags>`), split into words exactly as bash splits it.
async fn start(dir: &std::path::Path, line: &str) -> Process {
    let out = tokio::process::Command::new("bash")
        .args(["-c", &format!("printf '%s\\0' {line}")])
        .output()
        .await
        .unwrap();
    let words: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    let mut env = Vec::new();
    let mut rest = words.as_slice();
    while let Some((k, v)) = rest.first().and_then(|w| w.split_once('=')) {
        env.push((k.to_owned(), v.to_owned()));
        rest = &rest[1..];
    }
    let flags = rest
        .strip_prefix(&[
            "cargo".into(),
            "run".into(),
            "--release".into(),
            "--".into(),
        ])
        .unwrap_or_else(|| panic!("a gateway line starts with `cargo run --release --`: {line}"));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Process::spawn_in(Some(dir), &env, &flags).await
}

#[tokio::test]
async fn readme_cookbook_runs_against_the_binary() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let book = cookbook(&readme);
    assert!(
        book.examples.len() >= 15,
        "the cookbook covers every endpoint ({} examples)",
        book.examples.len()
    );
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in &book.files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let store = format!("file:{}", dir.path().join("default-data").display());
    let mut gateways: HashMap<String, Process> = HashMap::new();
    gateways.insert("default".into(), Process::spawn(&["--store", &store]).await);
    for ex in &book.examples {
        assert!(
            !ex.expect.is_empty(),
            "every cookbook command says what it prints: {}",
            ex.command
        );
        if !gateways.contains_key(&ex.gateway) {
            let line = book.gateways.get(&ex.gateway).unwrap_or_else(|| {
                panic!("no ```sh cookbook-gateway {} block starts it", ex.gateway)
            });
            gateways.insert(ex.gateway.clone(), start(dir.path(), line).await);
        }
        let command = ex
            .command
            .replace("http://localhost:8080", &gateways[&ex.gateway].base());
        let out = tokio::process::Command::new("bash")
            .args(["-c", &command])
            .current_dir(dir.path())
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{command}\nfailed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for e in &ex.expect {
            assert!(
                stdout.contains(e.as_str()),
                "{command}\nprinted:\n{stdout}\nexpected it to contain: {e}"
            );
        }
    }
    assert!(
        book.gateways.keys().all(|g| gateways.contains_key(g)),
        "every cookbook gateway has examples"
    );
}

/// SIGTERM stops the binary cleanly (exit status 0), and the file store keeps what it had.
#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().display());
    let mut gw = Process::spawn(&["--store", &store]).await;
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/v1/threads", gw.base()))
        .json(&serde_json::json!({"id": "kept"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    gw.terminate().await;
    let again = Process::spawn(&["--store", &store]).await;
    let res = http
        .get(format!("{}/v1/threads/kept", again.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}
