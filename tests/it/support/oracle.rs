//! The oracle: the same deltas applied once, in version order, by the library's
//! [`MemoryStore`], and a comparison of every field the gateway serves with it. That is
//! exactly-once: no delta applied twice, none lost.

use super::get_json;
use crate::harness::enc;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use threadgate::id::ThreadId;
use threadgate::model::{ChangeSet, Thread};
use threadgate::store::{Expect, MemoryStore, Store};

/// The same deltas applied once, in memory, by the library.
pub struct Oracle(pub MemoryStore);

impl Oracle {
    pub fn new() -> Self {
        Oracle(MemoryStore::new())
    }

    pub async fn create(&self, body: &Value) {
        let thread: Thread = serde_json::from_value(body.clone()).unwrap();
        let id = ThreadId::parse(&thread.id).unwrap();
        self.0.create(&id, thread).await.unwrap();
    }

    /// Applies the acknowledged deltas in version order; the versions must be exactly
    /// `1..=n` (none missing, none twice).
    pub async fn apply(&self, id: &str, mut acked: Vec<(u64, Value)>) -> u64 {
        acked.sort_by_key(|(v, _)| *v);
        let versions: Vec<u64> = acked.iter().map(|(v, _)| *v).collect();
        let want: Vec<u64> = (1..=acked.len() as u64).collect();
        assert_eq!(
            versions,
            want,
            "thread {id}: the acknowledged versions are not exactly 1..={}",
            acked.len()
        );
        let tid = ThreadId::parse(id).unwrap();
        for (v, delta) in acked {
            let cs: ChangeSet = serde_json::from_value(delta).unwrap();
            let got = self.0.append(&tid, &cs, Expect::Any, None).await.unwrap();
            assert_eq!(got.version, v);
        }
        versions.len() as u64
    }

    /// Asserts that the gateway at `base` holds exactly the oracle's thread: every field of
    /// the snapshot, the state, every message page, the runs, and the live view.
    pub async fn assert_matches(&self, http: &reqwest::Client, base: &str, id: &str) {
        let tid = ThreadId::parse(id).unwrap();
        let snap = self.0.get(&tid).await.unwrap();
        let want = serde_json::to_value(snap.to_wire()).unwrap();
        let path = format!("/v1/threads/{}", enc(id));
        let got = get_json(http, base, &path).await;

        assert_eq!(got["version"], snap.version, "thread {id}: version");
        for field in ["id", "resource_id", "parent_thread_id", "state"] {
            assert_eq!(got[field], want[field], "thread {id}: field {field}");
        }
        for field in ["messages", "patches"] {
            assert_same_list(id, field, &got[field], &want[field]);
        }
        let strip = |m: &Value| {
            let mut m = m.as_object().cloned().unwrap_or_default();
            threadgate::store::strip_server_metadata(&mut m);
            m
        };
        assert_eq!(
            strip(&got["metadata"]),
            strip(&want["metadata"]),
            "thread {id}: custom metadata"
        );
        assert_eq!(got["metadata"]["version"], snap.version, "thread {id}");

        let st = self.0.state(&tid).await.unwrap();
        let (state, version) = (st.state, st.version);
        assert_eq!(
            get_json(http, base, &format!("{path}/state")).await,
            json!({"state": state, "version": version}),
            "thread {id}: /state"
        );

        // Every message page, by cursor.
        let mut paged = Vec::new();
        let mut after: Option<u64> = None;
        loop {
            let q = match after {
                Some(a) => format!("{path}/messages?visibility=any&limit=200&after={a}"),
                None => format!("{path}/messages?visibility=any&limit=200"),
            };
            let page = get_json(http, base, &q).await;
            assert_eq!(page["version"], snap.version, "thread {id}: page version");
            for m in page["messages"].as_array().unwrap() {
                let mut m = m.clone();
                let cursor = m.as_object_mut().unwrap().remove("cursor").unwrap();
                assert_eq!(cursor, paged.len() as u64, "thread {id}: cursor");
                paged.push(m);
            }
            match page["next_cursor"].as_u64() {
                Some(c) if page["has_more"] == true => after = Some(c),
                _ => break,
            }
        }
        assert_same_list(
            id,
            "messages (paged)",
            &Value::Array(paged),
            &want["messages"],
        );

        // Runs, keyed by run id; timestamps are the server's own.
        let runs = |list: Value| -> BTreeMap<String, Value> {
            list.as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    let o = r.as_object_mut().unwrap();
                    o.remove("created_at");
                    o.remove("updated_at");
                    (o["run_id"].as_str().unwrap().to_owned(), r)
                })
                .collect()
        };
        let want_runs = runs(serde_json::to_value(self.0.runs(&tid).await.unwrap()).unwrap());
        let got_runs = runs(get_json(http, base, &format!("{path}/runs")).await);
        assert_eq!(got_runs, want_runs, "thread {id}: runs");

        let live = get_json(http, base, &format!("{path}?view=live")).await;
        assert_eq!(live["version"], snap.version, "thread {id}: live version");
        assert_same_list(id, "messages (live)", &live["messages"], &want["messages"]);
        assert_eq!(live["state"], want["state"], "thread {id}: live state");
    }
}

/// Compares two JSON arrays, naming the first difference instead of dumping both.
pub fn assert_same_list(id: &str, what: &str, got: &Value, want: &Value) {
    let (g, w) = (got.as_array().unwrap(), want.as_array().unwrap());
    if let Some(i) = (0..g.len().min(w.len())).find(|&i| g[i] != w[i]) {
        panic!(
            "thread {id}: {what}[{i}] differs (lengths {} vs {} expected)\n got: {}\nwant: {}",
            g.len(),
            w.len(),
            g[i],
            w[i]
        );
    }
    assert_eq!(
        g.len(),
        w.len(),
        "thread {id}: {what}: {} items, {} expected",
        g.len(),
        w.len()
    );
}
