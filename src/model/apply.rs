//! Applying a delta (a `ChangeSet`) to a thread, and number normalization (`docs/wire.md`).
//!
//! [`plan_delta`] computes what a delta does without changing anything, so row-based stores can
//! write only the new rows; [`apply_delta`] applies that plan to an in-memory [`Thread`].

use std::collections::HashSet;

use serde_json::{Number, Value};

use super::limits::{MAX_STATE_DEPTH, depth};
use super::patch::{PatchError, apply_patch};
use super::{ChangeSet, Message, Op, Thread, TrackedPatch};

/// A delta that cannot be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DeltaError {
    /// A patch op failed against the current state. Names the failing op for the HTTP 400:
    /// field path like `patches[2].patch.ops[0]`.
    #[error("patches[{patch}].patch.ops[{op}] ({}): {error}", .error.op)]
    Patch {
        /// Index of the patch in the delta.
        patch: usize,
        /// Index of the op in the patch.
        op: usize,
        /// Why the op failed.
        error: PatchError,
    },
    /// The delta's `snapshot` nests deeper than [`MAX_STATE_DEPTH`].
    #[error("snapshot: nests {depth} levels deep; the limit is {limit}")]
    SnapshotTooDeep {
        /// How deep the snapshot is.
        depth: usize,
        /// The limit.
        limit: usize,
    },
}

impl DeltaError {
    /// The wire field the error is about, e.g. `patches[2].patch.ops[0]`.
    pub fn field(&self) -> String {
        match self {
            DeltaError::Patch { patch, op, .. } => format!("patches[{patch}].patch.ops[{op}]"),
            DeltaError::SnapshotTooDeep { .. } => "snapshot".to_owned(),
        }
    }

    /// The reason alone, without the field.
    pub fn reason(&self) -> String {
        match self {
            DeltaError::Patch { error, .. } => error.to_string(),
            DeltaError::SnapshotTooDeep { depth, limit } => {
                format!("nests {depth} levels deep; the limit is {limit}")
            }
        }
    }
}

/// What applying a delta does, computed without changing anything (so row-based stores can use
/// it).
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaPlan {
    /// Indices into `delta.messages` of the messages to append, in order. A message whose id is
    /// already in the thread (per `exists`) or earlier in this same delta is skipped; messages
    /// without an id are always appended.
    pub new_messages: Vec<usize>,
    /// The thread's current state after the delta (snapshot applied if present and non-null,
    /// then the delta's patches).
    pub new_current_state: Value,
    /// True when the delta carried a non-null snapshot: base state := snapshot and existing
    /// patches cleared.
    pub replaces_state: bool,
}

/// The snapshot a delta carries, if it is present and not `null`.
fn snapshot_of(delta: &ChangeSet) -> Option<&Value> {
    delta.snapshot.as_ref().filter(|s| !s.is_null())
}

/// Computes what applying `delta` to a thread does. `current_state` is the thread's current
/// (rebuilt) state; `exists` says whether a message id is already in the thread.
pub fn plan_delta(
    current_state: &Value,
    delta: &ChangeSet,
    exists: impl Fn(&str) -> bool,
) -> Result<DeltaPlan, DeltaError> {
    // 1. snapshot
    let snapshot = snapshot_of(delta);
    if let Some(s) = snapshot {
        let depth = depth(s);
        if depth > MAX_STATE_DEPTH {
            return Err(DeltaError::SnapshotTooDeep {
                depth,
                limit: MAX_STATE_DEPTH,
            });
        }
    }
    let mut state = snapshot.unwrap_or(current_state).clone();

    // 2. messages, deduplicated by id
    let mut seen: HashSet<&str> = HashSet::new();
    let new_messages = delta
        .messages
        .iter()
        .enumerate()
        .filter(|(_, m)| match m.id.as_deref() {
            None => true,
            Some(id) => !exists(id) && seen.insert(id),
        })
        .map(|(i, _)| i)
        .collect();

    // 3. patches must apply to the state as it stands after the snapshot
    for (pi, tp) in delta.patches.iter().enumerate() {
        apply_patch(&mut state, &tp.patch).map_err(|(oi, error)| DeltaError::Patch {
            patch: pi,
            op: oi,
            error,
        })?;
    }

    Ok(DeltaPlan {
        new_messages,
        new_current_state: state,
        replaces_state: snapshot.is_some(),
    })
}

/// Applies a delta to `thread` and to `current_state` (the thread's rebuilt state, which the
/// caller caches). On error neither is changed. Returns the plan that was applied.
pub fn apply_delta(
    thread: &mut Thread,
    current_state: &mut Value,
    delta: &ChangeSet,
) -> Result<DeltaPlan, DeltaError> {
    let plan = {
        let ids: HashSet<&str> = thread
            .messages
            .iter()
            .filter_map(|m| m.id.as_deref())
            .collect();
        plan_delta(current_state, delta, |id| ids.contains(id))?
    };

    if let Some(snapshot) = snapshot_of(delta) {
        thread.state = snapshot.clone();
        thread.patches.clear();
    }
    thread
        .messages
        .extend(plan.new_messages.iter().map(|&i| delta.messages[i].clone()));
    thread.patches.extend(delta.patches.iter().cloned());
    *current_state = plan.new_current_state.clone();
    Ok(plan)
}

/// `docs/wire.md`: integers that fit i64 stay integers; others (u64 > i64::MAX) become floats.
/// Recursively normalizes a Value in place.
pub fn normalize_numbers(v: &mut Value) {
    match v {
        Value::Number(n) => normalize_number(n),
        Value::Array(items) => items.iter_mut().for_each(normalize_numbers),
        Value::Object(map) => map.values_mut().for_each(normalize_numbers),
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

/// A u64 above i64::MAX becomes the nearest f64; everything else is left as is.
fn normalize_number(n: &mut Number) {
    if let (Some(u), None) = (n.as_u64(), n.as_i64())
        && let Some(f) = Number::from_f64(u as f64)
    {
        *n = f;
    }
}

fn normalize_map(map: &mut super::Extra) {
    map.values_mut().for_each(normalize_numbers);
}

fn normalize_message(m: &mut Message) {
    for call in m.tool_calls.iter_mut().flatten() {
        normalize_numbers(&mut call.arguments);
    }
    if let Some(meta) = &mut m.metadata {
        normalize_map(&mut meta.extra);
    }
    normalize_map(&mut m.extra);
}

fn normalize_patches(patches: &mut [TrackedPatch]) {
    for op in patches.iter_mut().flat_map(|tp| tp.patch.ops.iter_mut()) {
        match op {
            Op::Set { value, .. }
            | Op::Append { value, .. }
            | Op::MergeObject { value, .. }
            | Op::Insert { value, .. }
            | Op::Remove { value, .. }
            | Op::LatticeMerge { value, .. } => normalize_numbers(value),
            Op::Increment { amount, .. } | Op::Decrement { amount, .. } => normalize_number(amount),
            Op::Delete { .. } => {}
        }
    }
}

impl ChangeSet {
    /// Runs [`normalize_numbers`] over every embedded JSON value: snapshot, op values and
    /// amounts, tool call arguments, message and run metadata, action payloads, extra maps.
    pub fn normalize(&mut self) {
        if let Some(snapshot) = &mut self.snapshot {
            normalize_numbers(snapshot);
        }
        self.messages.iter_mut().for_each(normalize_message);
        normalize_patches(&mut self.patches);
        if let Some(meta) = &mut self.run_meta {
            normalize_map(&mut meta.extra);
        }
        for action in self.actions.iter_mut().flatten() {
            normalize_numbers(&mut action.payload);
            normalize_map(&mut action.extra);
        }
        normalize_map(&mut self.extra);
    }
}

impl Thread {
    /// Runs [`normalize_numbers`] over every embedded JSON value: state, op values and
    /// amounts, tool call arguments, message metadata and extra maps, thread metadata.
    pub fn normalize(&mut self) {
        normalize_numbers(&mut self.state);
        self.messages.iter_mut().for_each(normalize_message);
        normalize_patches(&mut self.patches);
        normalize_map(&mut self.metadata);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::patch::PatchErrorKind;
    use crate::model::{Reason, Role};
    use serde_json::json;

    fn delta(v: Value) -> ChangeSet {
        serde_json::from_value(v).expect("valid delta")
    }

    fn msg(id: Option<&str>, content: &str) -> Value {
        match id {
            Some(id) => json!({"id": id, "role": "user", "content": content}),
            None => json!({"role": "user", "content": content}),
        }
    }

    fn thread_with(messages: Value, state: Value, patches: Value) -> Thread {
        serde_json::from_value(json!({
            "id": "t1", "messages": messages, "state": state, "patches": patches
        }))
        .unwrap()
    }

    fn contents(t: &Thread) -> Vec<&str> {
        t.messages.iter().map(|m| m.content.as_str()).collect()
    }

    // ---- plan_delta ------------------------------------------------------------------------

    #[test]
    fn smallest_delta_is_a_noop() {
        let d = delta(json!({"run_id":"r1","reason":"RunFinished","messages":[],"patches":[]}));
        let plan = plan_delta(&json!({"a": 1}), &d, |_| false).unwrap();
        assert_eq!(
            plan,
            DeltaPlan {
                new_messages: vec![],
                new_current_state: json!({"a": 1}),
                replaces_state: false
            }
        );
    }

    #[test]
    fn plan_dedups_against_thread_and_within_delta() {
        let d = delta(json!({
            "run_id": "r1", "reason": "UserMessage",
            "messages": [
                msg(Some("old"), "0"),
                msg(Some("m1"), "1"),
                msg(None, "2"),
                msg(Some("m1"), "3"),
                msg(None, "4"),
                msg(Some("m2"), "5"),
                msg(Some("old"), "6"),
            ],
            "patches": []
        }));
        let plan = plan_delta(&json!({}), &d, |id| id == "old").unwrap();
        assert_eq!(plan.new_messages, vec![1, 2, 4, 5]);
        assert!(!plan.replaces_state);
    }

    #[test]
    fn plan_applies_snapshot_then_patches() {
        let d = delta(json!({
            "run_id": "r1", "reason": "RunFinished", "messages": [],
            "snapshot": {"n": 10},
            "patches": [{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}]
        }));
        let plan = plan_delta(&json!({"other": true}), &d, |_| false).unwrap();
        assert!(plan.replaces_state);
        assert_eq!(plan.new_current_state, json!({"n": 11}));
    }

    #[test]
    fn plan_patches_apply_against_snapshot_not_old_state() {
        // `n` exists only in the old state: against the snapshot the increment must fail.
        let d = delta(json!({
            "run_id": "r1", "reason": "RunFinished", "messages": [],
            "snapshot": {},
            "patches": [{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}]
        }));
        let err = plan_delta(&json!({"n": 1}), &d, |_| false).unwrap_err();
        let DeltaError::Patch { patch, op, error } = &err else {
            panic!("{err}");
        };
        assert_eq!((*patch, *op), (0, 0));
        assert_eq!(error.kind, PatchErrorKind::PathNotFound);
    }

    #[test]
    fn null_snapshot_is_ignored() {
        let d = delta(json!({
            "run_id": "r1", "reason": "RunFinished", "messages": [], "patches": [],
            "snapshot": null
        }));
        let plan = plan_delta(&json!({"a": 1}), &d, |_| false).unwrap();
        assert!(!plan.replaces_state);
        assert_eq!(plan.new_current_state, json!({"a": 1}));
    }

    #[test]
    fn plan_error_names_patch_and_op() {
        let d = delta(json!({
            "run_id": "r1", "reason": "RunFinished", "messages": [],
            "patches": [
                {"patch": {"ops": [{"op": "set", "path": ["a"], "value": 1}]}},
                {"patch": {"ops": []}},
                {"patch": {"ops": [
                    {"op": "set", "path": ["b"], "value": 1},
                    {"op": "append", "path": ["a"], "value": 2}
                ]}}
            ]
        }));
        let err = plan_delta(&json!({}), &d, |_| false).unwrap_err();
        assert_eq!(err.field(), "patches[2].patch.ops[1]");
        assert_eq!(
            err,
            DeltaError::Patch {
                patch: 2,
                op: 1,
                error: PatchError {
                    op: "append",
                    path: "/a".into(),
                    kind: PatchErrorKind::NotAnArray { found: "a number" }
                }
            }
        );
        assert_eq!(
            err.to_string(),
            "patches[2].patch.ops[1] (append): append at /a: target is a number, not an array"
        );
    }

    // ---- apply_delta -----------------------------------------------------------------------

    #[test]
    fn apply_delta_appends_messages_and_patches() {
        let mut t = thread_with(
            json!([msg(Some("a"), "A"), msg(None, "x")]),
            json!({"n": 1}),
            json!([{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}]),
        );
        let mut cur = json!({"n": 2});
        let d = delta(json!({
            "run_id": "r1", "reason": "AssistantTurnCommitted",
            "messages": [msg(Some("a"), "dup"), msg(Some("b"), "B"), msg(None, "y"),
                         msg(Some("b"), "dup2"), msg(None, "z")],
            "patches": [{"id": "p2", "patch": {"ops": [{"op": "set", "path": ["s"], "value": "v"}]}}]
        }));
        let plan = apply_delta(&mut t, &mut cur, &d).unwrap();
        assert_eq!(plan.new_messages, vec![1, 2, 4]);
        assert_eq!(contents(&t), vec!["A", "x", "B", "y", "z"]);
        assert_eq!(
            t.state,
            json!({"n": 1}),
            "base state unchanged without snapshot"
        );
        assert_eq!(t.patches.len(), 2);
        assert_eq!(t.patches[1].id.as_deref(), Some("p2"));
        assert_eq!(cur, json!({"n": 2, "s": "v"}));
        assert_eq!(plan.new_current_state, cur);
        // The cached current state matches a rebuild from the thread.
        assert_eq!(
            crate::model::rebuild_state(&t.state, &t.patches).unwrap(),
            cur
        );
    }

    #[test]
    fn apply_delta_snapshot_replaces_state_and_clears_patches() {
        let mut t = thread_with(
            json!([]),
            json!({"n": 1}),
            json!([{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}]),
        );
        let mut cur = json!({"n": 2});
        let d = delta(json!({
            "run_id": "r1", "reason": "RunFinished",
            "messages": [msg(Some("m"), "M")],
            "snapshot": {"fresh": [1]},
            "patches": [{"patch": {"ops": [{"op": "append", "path": ["fresh"], "value": 2}]}}]
        }));
        let plan = apply_delta(&mut t, &mut cur, &d).unwrap();
        assert!(plan.replaces_state);
        assert_eq!(t.state, json!({"fresh": [1]}));
        assert_eq!(t.patches, d.patches, "old patches cleared, delta's kept");
        assert_eq!(cur, json!({"fresh": [1, 2]}));
        assert_eq!(contents(&t), vec!["M"]);
        assert_eq!(
            crate::model::rebuild_state(&t.state, &t.patches).unwrap(),
            cur
        );
    }

    #[test]
    fn apply_delta_rejected_changes_nothing() {
        let mut t = thread_with(
            json!([msg(Some("a"), "A")]),
            json!({"n": 1}),
            json!([{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": 1}]}}]),
        );
        let before = t.clone();
        let mut cur = json!({"n": 2});
        let d = delta(json!({
            "run_id": "r1", "reason": "RunFinished",
            "messages": [msg(Some("b"), "B"), msg(None, "c")],
            "snapshot": {"s": 1},
            "patches": [
                {"patch": {"ops": [{"op": "set", "path": ["ok"], "value": 1}]}},
                {"patch": {"ops": [{"op": "increment", "path": ["s"], "amount": i64::MAX - 1}]}},
                {"patch": {"ops": [{"op": "increment", "path": ["s"], "amount": 1}]}}
            ]
        }));
        let err = apply_delta(&mut t, &mut cur, &d).unwrap_err();
        assert_eq!(err.field(), "patches[2].patch.ops[0]");
        assert!(matches!(
            err,
            DeltaError::Patch {
                error: PatchError {
                    kind: PatchErrorKind::Overflow { .. },
                    ..
                },
                ..
            }
        ));
        assert_eq!(t, before);
        assert_eq!(cur, json!({"n": 2}));
    }

    #[test]
    fn apply_delta_message_ids_from_thread_with_id_less_messages() {
        let mut t = thread_with(json!([msg(None, "x")]), json!({}), json!([]));
        let mut cur = json!({});
        let d = delta(json!({
            "run_id": "r1", "reason": "UserMessage",
            "messages": [msg(None, "x")], "patches": []
        }));
        apply_delta(&mut t, &mut cur, &d).unwrap();
        apply_delta(&mut t, &mut cur, &d).unwrap();
        assert_eq!(contents(&t), vec!["x", "x", "x"]);
    }

    // ---- numbers ---------------------------------------------------------------------------

    #[test]
    fn normalize_numbers_turns_big_u64_into_float() {
        let mut v = json!({
            "big": u64::MAX,
            "edge": i64::MAX as u64,
            "over": i64::MAX as u64 + 1,
            "neg": -5,
            "f": 1.5,
            "nested": [{"x": u64::MAX}, 3]
        });
        normalize_numbers(&mut v);
        assert!(v["big"].is_f64());
        assert_eq!(v["big"].as_f64(), Some(u64::MAX as f64));
        assert!(v["edge"].is_i64());
        assert_eq!(v["edge"].as_i64(), Some(i64::MAX));
        assert!(v["over"].is_f64());
        assert_eq!(v["over"].as_f64(), Some(9223372036854775808.0));
        assert_eq!(v["neg"], json!(-5));
        assert_eq!(v["f"], json!(1.5));
        assert!(v["nested"][0]["x"].is_f64());
        assert!(v["nested"][1].is_i64());
        assert_eq!(
            serde_json::to_string(&v["over"]).unwrap(),
            "9.223372036854776e+18"
        );
    }

    #[test]
    fn changeset_normalize_covers_every_embedded_value() {
        let big = u64::MAX;
        let mut d = delta(json!({
            "run_id": "r1", "reason": "ToolResultsCommitted",
            "run_meta": {"agent_id": "a", "origin": "user", "status": "done",
                         "input_tokens": big, "output_tokens": 1, "custom": big},
            "messages": [{
                "id": "m", "role": "assistant", "content": "",
                "tool_calls": [{"id": "c", "name": "n", "arguments": {"x": big}}],
                "metadata": {"run_id": "r1", "step_index": big, "k": big},
                "unknown": big
            }],
            "patches": [{"patch": {"ops": [
                {"op": "set", "path": ["a"], "value": big},
                {"op": "increment", "path": ["a"], "amount": big},
                {"op": "decrement", "path": ["a"], "amount": 3},
                {"op": "insert", "path": ["l"], "index": 0, "value": [big]}
            ]}}],
            "actions": [{"state_type_name": "T", "base_path": "p", "scope": "run",
                         "call_id_override": null, "payload": {"y": big}, "more": big}],
            "snapshot": {"s": big},
            "top": big
        }));
        d.normalize();
        let v = serde_json::to_value(&d).unwrap();
        assert!(v["snapshot"]["s"].is_f64());
        assert!(v["top"].is_f64());
        assert!(v["messages"][0]["unknown"].is_f64());
        assert!(v["messages"][0]["tool_calls"][0]["arguments"]["x"].is_f64());
        assert!(v["messages"][0]["metadata"]["k"].is_f64());
        // Typed u64 fields are not JSON values and stay integers.
        assert_eq!(v["messages"][0]["metadata"]["step_index"], json!(big));
        assert_eq!(v["run_meta"]["input_tokens"], json!(big));
        assert!(v["run_meta"]["custom"].is_f64());
        let ops = &v["patches"][0]["patch"]["ops"];
        assert!(ops[0]["value"].is_f64());
        assert!(ops[1]["amount"].is_f64());
        assert_eq!(ops[2]["amount"], json!(3));
        assert!(ops[3]["value"][0].is_f64());
        assert!(v["actions"][0]["payload"]["y"].is_f64());
        assert!(v["actions"][0]["more"].is_f64());
    }

    #[test]
    fn thread_normalize_covers_every_embedded_value() {
        let big = u64::MAX;
        let mut t: Thread = serde_json::from_value(json!({
            "id": "t",
            "messages": [{"role": "tool", "content": "", "tool_call_id": "c", "x": big}],
            "state": {"s": [big, 1]},
            "patches": [{"patch": {"ops": [{"op": "increment", "path": ["n"], "amount": big}]}}],
            "metadata": {"version": 3, "custom": big}
        }))
        .unwrap();
        t.normalize();
        assert!(t.state["s"][0].is_f64());
        assert!(t.state["s"][1].is_i64());
        assert!(t.messages[0].extra["x"].is_f64());
        assert!(t.metadata["custom"].is_f64());
        assert_eq!(t.metadata["version"], json!(3));
        match &t.patches[0].patch.ops[0] {
            Op::Increment { amount, .. } => assert_eq!(amount.as_f64(), Some(big as f64)),
            other => panic!("unexpected op {other:?}"),
        }
        match &t.patches[0].patch.ops[0] {
            Op::Increment { amount, .. } => assert!(amount.is_f64()),
            _ => unreachable!(),
        }
    }

    #[test]
    fn floats_round_trip_exactly_and_stay_floats() {
        let text = r#"{"run_id":"r","reason":"RunFinished","messages":[],"patches":[
            {"patch":{"ops":[{"op":"set","path":["a"],"value":1e+16},
                             {"op":"set","path":["b"],"value":0.30000000000000004},
                             {"op":"set","path":["c"],"value":1.0},
                             {"op":"increment","path":["c"],"amount":2.5e-324}]}}],
            "snapshot":{"x":1e+16,"y":0.1,"z":1.7976931348623157e308}}"#;
        let d: ChangeSet = serde_json::from_str(text).unwrap();
        let snap = d.snapshot.as_ref().unwrap();
        assert!(snap["x"].is_f64(), "1e+16 must stay a float");
        assert_eq!(serde_json::to_string(&snap["x"]).unwrap(), "1e+16");
        assert_eq!(snap["y"].as_f64().unwrap().to_bits(), 0.1f64.to_bits());
        assert_eq!(snap["z"].as_f64(), Some(f64::MAX));
        let out = serde_json::to_string(&d).unwrap();
        let back: ChangeSet = serde_json::from_str(&out).unwrap();
        assert_eq!(back, d);
        let snap2 = back.snapshot.as_ref().unwrap();
        assert!(snap2["x"].is_f64());
        assert_eq!(snap2["x"].as_f64(), Some(1e16));
        match &back.patches[0].patch.ops[0] {
            Op::Set { value, .. } => {
                assert!(value.is_f64());
                assert_eq!(value.as_f64(), Some(1e16));
            }
            other => panic!("unexpected op {other:?}"),
        }
        match &back.patches[0].patch.ops[1] {
            Op::Set { value, .. } => {
                assert_eq!(value.as_f64().unwrap().to_bits(), (0.1f64 + 0.2).to_bits())
            }
            other => panic!("unexpected op {other:?}"),
        }
        match &back.patches[0].patch.ops[2] {
            Op::Set { value, .. } => assert_eq!(serde_json::to_string(value).unwrap(), "1.0"),
            other => panic!("unexpected op {other:?}"),
        }
        // 0.1 + 0.2 computed by increment, through serde and back, is bit-exact.
        let plan = plan_delta(&json!({}), &d, |_| false).unwrap();
        assert!(plan.new_current_state["a"].is_f64());
        let s = serde_json::to_string(&plan.new_current_state).unwrap();
        let reparsed: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(reparsed, plan.new_current_state);
    }

    #[test]
    fn unknown_fields_survive_round_trip() {
        let text = r#"{
            "run_id": "r1", "reason": "UserMessage", "future_field": {"a": [1, 2.0]},
            "messages": [
                {"id": "m1", "role": "user", "content": "hi", "new_thing": "kept",
                 "tool_calls": [], "metadata": {}},
                {"id": "m2", "role": "assistant", "content": "", "visibility": "internal",
                 "metadata": {"run_id": "r1", "step_index": 2, "extra_meta": true}},
                {"role": "user", "content": "no id"}
            ],
            "patches": []
        }"#;
        let d: ChangeSet = serde_json::from_str(text).unwrap();
        assert_eq!(d.reason, Reason::UserMessage);
        assert_eq!(d.extra["future_field"], json!({"a": [1, 2.0]}));
        assert_eq!(d.messages[0].extra["new_thing"], json!("kept"));
        assert_eq!(d.messages[0].tool_calls, Some(vec![]));
        assert!(d.messages[0].metadata.is_some());
        assert_eq!(d.messages[1].role, Role::Assistant);
        assert_eq!(d.messages[2].tool_calls, None);
        assert_eq!(d.messages[2].metadata, None);

        let out: Value = serde_json::to_value(&d).unwrap();
        let expected: Value = serde_json::from_str(text).unwrap();
        assert_eq!(out, expected);
        // Explicit text checks: `[]`/`{}` kept, absent stays absent, 2.0 stays a float.
        let out_text = serde_json::to_string(&d).unwrap();
        assert!(
            out_text.contains(r#""future_field":{"a":[1,2.0]}"#),
            "{out_text}"
        );
        assert!(out_text.contains(r#""tool_calls":[]"#), "{out_text}");
        assert!(out_text.contains(r#""metadata":{}"#), "{out_text}");
        let m3 = serde_json::to_string(&d.messages[2]).unwrap();
        assert_eq!(m3, r#"{"role":"user","content":"no id"}"#);
        // Visibility `all` is omitted, `internal` kept.
        assert!(
            !out["messages"][0]
                .as_object()
                .unwrap()
                .contains_key("visibility")
        );
        assert_eq!(out["messages"][1]["visibility"], json!("internal"));
    }

    #[test]
    fn unknown_fields_survive_apply_delta() {
        let mut t = Thread::new("t");
        let mut cur = json!({});
        let d = delta(json!({
            "run_id": "r1", "reason": "UserMessage",
            "messages": [{"id": "m", "role": "user", "content": "c", "x-new": [1]}],
            "patches": []
        }));
        apply_delta(&mut t, &mut cur, &d).unwrap();
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["messages"][0]["x-new"], json!([1]));
    }
}
