//! Nesting limits: why no input can build a value the gateway cannot read back.
//!
//! serde_json refuses documents nested deeper than 128 levels, and every recursive function
//! over a `Value` (clone, drop, equality, serialisation) uses stack in proportion to its
//! depth. A patch path creates one level per segment, so without a bound a ~1 KB request
//! could build a state that no later read, fold or restart can parse, or that overflows a
//! worker thread's stack when it is dropped. Two limits close that door:
//!
//! * [`MAX_BODY_DEPTH`]: a request body may nest at most this many arrays/objects. It is
//!   checked on the raw bytes before parsing ([`body_depth`]), so every value a client sends
//!   (message fields, metadata, tool arguments, op values) is bounded.
//! * [`MAX_STATE_DEPTH`]: a thread's state may nest at most this many levels. A base state,
//!   a delta's `snapshot`, and every patch op are checked: an op's path plus the depth of its
//!   value (plus one for ops that add an array element) must fit, so a state built by any
//!   sequence of accepted ops stays within it. A path longer than the limit can never name
//!   anything and is refused for every op.
//!
//! Stored documents wrap these values in a few more levels (a file-store record, a history
//! entry, a log entry, an SSE event: at most about a dozen), so everything the gateway writes
//! stays far below serde_json's 128 and recursion stays shallow. `tests::deepest_accepted_*`
//! run the whole model on the deepest accepted input on a deliberately small stack.

use super::{ChangeSet, Message, Thread};
use serde_json::Value;

/// Longest accepted key, in bytes: a `resource_id`, `parent_thread_id`, message `id`,
/// `run_id` or `parent_run_id`. These sit in indexed columns (PostgreSQL refuses an index
/// entry above about 2.7 KB, and a key is stored JSON-escaped, up to six bytes per byte), so an
/// unbounded one would be accepted into the log and then fail every fold. 256 bytes hold any
/// UUID, e-mail address or path-like id with room to spare.
pub const MAX_KEY_LEN: usize = 256;

/// Default for `--max-delta-messages`: messages in one delta (an agent step holds a handful).
pub const DEFAULT_MAX_DELTA_MESSAGES: usize = 1_000;

/// Default for `--max-delta-ops`: patch ops in one delta, summed over its patches (and the
/// number of patches).
pub const DEFAULT_MAX_DELTA_OPS: usize = 10_000;

/// Per-delta counts the gateway bounds (`--max-delta-messages`, `--max-delta-ops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaLimits {
    /// Messages in one delta.
    pub messages: usize,
    /// Patch ops in one delta, summed over its patches; also the most patches one delta holds.
    pub ops: usize,
}

impl Default for DeltaLimits {
    fn default() -> Self {
        DeltaLimits {
            messages: DEFAULT_MAX_DELTA_MESSAGES,
            ops: DEFAULT_MAX_DELTA_OPS,
        }
    }
}

/// A bound a request broke: the field at fault and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct LimitError {
    /// The field, e.g. `messages` or `messages[3].id`.
    pub field: String,
    /// What the limit is.
    pub message: String,
}

fn key(field: impl FnOnce() -> String, value: Option<&str>) -> Result<(), LimitError> {
    match value {
        Some(v) if v.len() > MAX_KEY_LEN => Err(LimitError {
            field: field(),
            message: format!(
                "is {} bytes long; the limit is {MAX_KEY_LEN} bytes",
                v.len()
            ),
        }),
        _ => Ok(()),
    }
}

fn message_keys(prefix: &str, messages: &[Message]) -> Result<(), LimitError> {
    for (i, m) in messages.iter().enumerate() {
        key(|| format!("{prefix}[{i}].id"), m.id.as_deref())?;
        key(|| format!("{prefix}[{i}].metadata.run_id"), m.run_id())?;
    }
    Ok(())
}

/// Checks a delta against the per-delta counts and the key length.
pub fn check_delta(delta: &ChangeSet, limits: &DeltaLimits) -> Result<(), LimitError> {
    if delta.messages.len() > limits.messages {
        return Err(LimitError {
            field: "messages".into(),
            message: format!(
                "{} messages in one delta; the limit is {} (--max-delta-messages)",
                delta.messages.len(),
                limits.messages
            ),
        });
    }
    let ops: usize = delta.patches.iter().map(|p| p.patch.ops.len()).sum();
    if delta.patches.len() > limits.ops || ops > limits.ops {
        return Err(LimitError {
            field: "patches".into(),
            message: format!(
                "{ops} patch ops in {} patches in one delta; the limit is {} of each \
                 (--max-delta-ops)",
                delta.patches.len(),
                limits.ops
            ),
        });
    }
    key(|| "run_id".into(), Some(&delta.run_id))?;
    key(|| "parent_run_id".into(), delta.parent_run_id.as_deref())?;
    message_keys("messages", &delta.messages)
}

/// Checks the keys of a thread body (create, full replace).
pub fn check_thread(thread: &Thread) -> Result<(), LimitError> {
    key(|| "resource_id".into(), thread.resource_id.as_deref())?;
    key(
        || "parent_thread_id".into(),
        thread.parent_thread_id.as_deref(),
    )?;
    message_keys("messages", &thread.messages)
}

/// Deepest nesting of arrays/objects accepted in a request body: far beyond any real agent
/// state, and with the wrappers of stored documents still well under serde_json's 128.
pub const MAX_BODY_DEPTH: usize = 64;

/// Deepest nesting of a thread's state (base state, snapshot, or built by patch ops). Below
/// [`MAX_BODY_DEPTH`] so a state read with GET can always be sent back in a PUT.
pub const MAX_STATE_DEPTH: usize = 48;

/// The nesting depth of a value: 0 for a scalar, 1 for `[]`/`{}`, 1 + the deepest child
/// otherwise. Iterative, so it is safe on any value.
pub fn depth(v: &Value) -> usize {
    let mut deepest = 0;
    let mut stack: Vec<(&Value, usize)> = vec![(v, 0)];
    while let Some((v, d)) = stack.pop() {
        match v {
            Value::Array(items) => {
                deepest = deepest.max(d + 1);
                stack.extend(items.iter().map(|i| (i, d + 1)));
            }
            Value::Object(map) => {
                deepest = deepest.max(d + 1);
                stack.extend(map.values().map(|i| (i, d + 1)));
            }
            _ => {}
        }
    }
    deepest
}

/// The deepest nesting of arrays/objects in raw JSON text, without parsing it (brackets
/// inside strings are skipped; escapes are honoured). Malformed text gives some number; the
/// parser reports the syntax error afterwards.
pub fn body_depth(bytes: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChangeSet, Thread, apply_delta, plan_delta, rebuild_state};
    use serde_json::json;

    fn nested(levels: usize) -> Value {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!({ "k": v });
        }
        v
    }

    #[test]
    fn depth_counts_containers() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!([[], {"a": [1]}])), 3);
        assert_eq!(depth(&nested(40)), 40);
        // Far deeper than any recursion could take, built without recursion.
        let mut deep = Value::Null;
        for _ in 0..100_000 {
            deep = Value::Array(vec![deep]);
        }
        assert_eq!(depth(&deep), 100_000);
        // Dropping it recursively could overflow the stack: take it apart by hand.
        while let Value::Array(mut items) = deep {
            deep = items.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn body_depth_ignores_brackets_in_strings() {
        assert_eq!(body_depth(br#"{"a":"[[[{{{","b":[1,{"c":"\"]"}]}"#), 3);
        assert_eq!(body_depth(br#""no containers""#), 0);
        assert_eq!(
            body_depth(nested(70).to_string().as_bytes()),
            depth(&nested(70))
        );
        assert_eq!(body_depth(&b"[".repeat(10_000)), 10_000);
    }

    /// A delta at every limit at once: the deepest accepted value for each op kind, a state
    /// at the state limit, a snapshot at the limit.
    fn deepest_accepted_delta() -> ChangeSet {
        let value_depth = MAX_STATE_DEPTH - 10;
        let path: Vec<Value> = (0..10).map(|i| json!(format!("p{i}"))).collect();
        let ops = json!([
            {"op": "set", "path": path, "value": nested(value_depth)},
            {"op": "append", "path": ["list"], "value": nested(MAX_STATE_DEPTH - 2)},
            {"op": "merge_object", "path": ["m"], "value": nested(MAX_STATE_DEPTH - 1)},
            {"op": "lattice_merge", "path": ["l"], "value": nested(MAX_STATE_DEPTH - 1)},
        ]);
        serde_json::from_value(json!({
            "run_id": "r", "reason": "RunFinished",
            "snapshot": nested(MAX_STATE_DEPTH),
            "messages": [{"role": "user", "content": "x", "deep": nested(MAX_BODY_DEPTH - 4)}],
            "patches": [{"patch": {"ops": ops}}]
        }))
        .expect("delta parses")
    }

    /// Everything the model does with the deepest accepted input runs on a small stack
    /// (256 KiB, an eighth of a tokio worker thread's default 2 MiB, in an unoptimised build), and what it builds
    /// serialises and parses back.
    #[test]
    fn deepest_accepted_input_runs_on_a_small_stack() {
        let worker = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let delta = deepest_accepted_delta();
                let text = serde_json::to_string(&delta).unwrap();
                assert!(body_depth(text.as_bytes()) <= MAX_BODY_DEPTH);
                let mut thread = Thread::new("t");
                let mut state = json!({});
                apply_delta(&mut thread, &mut state, &delta).expect("accepted");
                assert!(depth(&state) <= MAX_STATE_DEPTH, "{}", depth(&state));
                let plan = plan_delta(&state, &delta, |_| false).expect("accepted again");
                let rebuilt = rebuild_state(&thread.state, &thread.patches).unwrap();
                assert_eq!(rebuilt, state);
                let mut copy = delta.clone();
                copy.normalize();
                assert_eq!(copy, delta);
                // The thread wrapped as stored documents are, parsed back.
                let stored =
                    json!({"record": {"thread": thread, "history": [{"change": {"body": delta}}]}});
                let back: Value = serde_json::from_str(&stored.to_string()).expect("parses back");
                assert_eq!(back, stored);
                drop((plan, back, stored, thread, state));
            })
            .unwrap();
        worker.join().expect("no stack overflow");
    }
}
