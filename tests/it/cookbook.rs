//! Runs the README's curl cookbook against a freshly started binary, so it cannot drift.
//!
//! Every ```` ```sh cookbook ```` block is split into commands (joining `\` continuations);
//! a following `# => text` line says what the command's output must contain. Commands run
//! in order, each in `bash -c`, with `http://localhost:8080` pointed at the test gateway.

use crate::harness::Process;

struct Example {
    command: String,
    expect: Vec<String>,
}

fn examples(readme: &str) -> Vec<Example> {
    let mut out: Vec<Example> = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in readme.lines() {
        if !in_block {
            in_block = line.trim() == "```sh cookbook";
            continue;
        }
        if line.trim() == "```" {
            in_block = false;
            continue;
        }
        if let Some(expect) = line.strip_prefix("# => ") {
            out.last_mut()
                .expect("an expectation follows a command")
                .expect
                .push(expect.to_owned());
        } else if line.starts_with('#') || line.trim().is_empty() {
            continue;
        } else if let Some(start) = line.strip_suffix('\\') {
            pending.push_str(start);
        } else {
            pending.push_str(line);
            out.push(Example {
                command: std::mem::take(&mut pending),
                expect: Vec::new(),
            });
        }
    }
    out
}

#[tokio::test]
async fn readme_cookbook_runs_against_the_binary() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let examples = examples(&readme);
    assert!(
        examples.len() >= 15,
        "the cookbook covers every endpoint ({} examples)",
        examples.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().display());
    let gw = Process::spawn(&["--store", &store]).await;
    for ex in &examples {
        assert!(
            !ex.expect.is_empty(),
            "every cookbook command says what it prints: {}",
            ex.command
        );
        let command = ex.command.replace("http://localhost:8080", &gw.base());
        let out = tokio::process::Command::new("bash")
            .args(["-c", &command])
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
