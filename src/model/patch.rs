//! Applying patch ops to a JSON state, exactly as the table in `docs/wire.md` says.
//!
//! Path walking has two modes:
//! - **creating** (`set`, `append`, `merge_object`, `lattice_merge`): a key segment turns a
//!   missing key, `null` or any non-object it meets into `{}`; an index segment never creates
//!   and must point into an array at a position `< len`.
//! - **existing** (`increment`, `decrement`, `insert`, `remove`): the whole path must exist; a
//!   `null` counts as existing, so meeting it is a type error rather than "not found".
//!
//! `delete` walks like the non-creating ops but treats any miss as a no-op.

use serde_json::{Map, Number, Value};

use super::limits::{MAX_STATE_DEPTH, depth};
use super::{Op, Patch, Seg, TrackedPatch};

/// One op failed: which op, at which path, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{op} at {path}: {kind}")]
pub struct PatchError {
    /// The wire name of the op (`set`, `increment`, …).
    pub op: &'static str,
    /// The op's path, rendered with `Path`'s `Display` (`/a/0/b`, `/` for the root).
    pub path: String,
    /// Why it failed.
    pub kind: PatchErrorKind,
}

/// Why an op failed. `found` fields name the JSON type that was met (`null`, `a number`, …).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatchErrorKind {
    /// A non-creating op met an object without the key it needed.
    #[error("path not found")]
    PathNotFound,
    /// An index segment (or `insert`'s index) past the end of the array.
    #[error("index {index} is out of bounds for an array of length {len}")]
    IndexOutOfBounds {
        /// The index asked for.
        index: usize,
        /// The array's length.
        len: usize,
    },
    /// An index segment met something that is not an array.
    #[error("index {index} used on {found}, which is not an array")]
    IndexIntoNonArray {
        /// The index asked for.
        index: usize,
        /// The JSON type met instead.
        found: &'static str,
    },
    /// A non-creating op's key segment met something that is not an object.
    #[error("key {key:?} used on {found}, which is not an object")]
    KeyIntoNonObject {
        /// The key asked for.
        key: String,
        /// The JSON type met instead.
        found: &'static str,
    },
    /// The target of `append`, `insert` or `remove` is not an array.
    #[error("target is {found}, not an array")]
    NotAnArray {
        /// The JSON type met instead.
        found: &'static str,
    },
    /// The target of `merge_object` is not an object.
    #[error("target is {found}, not an object")]
    NotAnObject {
        /// The JSON type met instead.
        found: &'static str,
    },
    /// `merge_object`'s value is not an object.
    #[error("value is {found}, not an object")]
    ValueNotAnObject {
        /// The value's JSON type.
        found: &'static str,
    },
    /// The target of `increment` / `decrement` is not a number.
    #[error("target is {found}, not a number")]
    NotANumber {
        /// The JSON type met instead.
        found: &'static str,
    },
    /// Integer arithmetic left the i64 range (never wraps).
    #[error("integer overflow: {current} {sign} {amount} does not fit in i64")]
    Overflow {
        /// The number before.
        current: i64,
        /// `+` or `-`.
        sign: char,
        /// The amount.
        amount: i64,
    },
    /// Float arithmetic produced an infinity or NaN.
    #[error("result of {current} {sign} {amount} is not a finite number")]
    NotFinite {
        /// The number before.
        current: f64,
        /// `+` or `-`.
        sign: char,
        /// The amount.
        amount: f64,
    },
    /// The op would nest the state deeper than [`MAX_STATE_DEPTH`] (its path plus its value),
    /// or its path is longer than that.
    #[error("would nest the state {depth} levels deep; the limit is {limit}")]
    TooDeep {
        /// How deep the state would get.
        depth: usize,
        /// The limit.
        limit: usize,
    },
}

/// The JSON type of a value, for error messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Walks `segs` for a creating op and returns the slot they name. A key segment makes the
/// current value an object if it is not one and inserts `null` for a missing key; an index
/// segment must meet an array and be in bounds.
fn walk_create<'a>(mut cur: &'a mut Value, segs: &[Seg]) -> Result<&'a mut Value, PatchErrorKind> {
    for seg in segs {
        cur = match seg {
            Seg::Key(key) => {
                if !cur.is_object() {
                    *cur = Value::Object(Map::new());
                }
                cur.as_object_mut()
                    .expect("just made an object")
                    .entry(key.clone())
                    .or_insert(Value::Null)
            }
            Seg::Index(index) => index_into(cur, *index)?,
        };
    }
    Ok(cur)
}

/// Walks `segs` for a non-creating op: every segment must exist.
fn walk_existing<'a>(
    mut cur: &'a mut Value,
    segs: &[Seg],
) -> Result<&'a mut Value, PatchErrorKind> {
    for seg in segs {
        cur = match seg {
            Seg::Key(key) => match cur {
                Value::Object(map) => map.get_mut(key).ok_or(PatchErrorKind::PathNotFound)?,
                other => {
                    return Err(PatchErrorKind::KeyIntoNonObject {
                        key: key.clone(),
                        found: type_name(other),
                    });
                }
            },
            Seg::Index(index) => index_into(cur, *index)?,
        };
    }
    Ok(cur)
}

fn index_into(cur: &mut Value, index: usize) -> Result<&mut Value, PatchErrorKind> {
    match cur {
        Value::Array(arr) => {
            let len = arr.len();
            arr.get_mut(index)
                .ok_or(PatchErrorKind::IndexOutOfBounds { index, len })
        }
        other => Err(PatchErrorKind::IndexIntoNonArray {
            index,
            found: type_name(other),
        }),
    }
}

/// `delete`: removes the key or element the path names; any miss is a no-op.
fn delete(root: &mut Value, segs: &[Seg]) {
    let Some((last, parents)) = segs.split_last() else {
        *root = Value::Null;
        return;
    };
    let mut cur = root;
    for seg in parents {
        let next = match (seg, cur) {
            (Seg::Key(key), Value::Object(map)) => map.get_mut(key),
            (Seg::Index(index), Value::Array(arr)) => arr.get_mut(*index),
            _ => None,
        };
        match next {
            Some(v) => cur = v,
            None => return,
        }
    }
    match (last, cur) {
        (Seg::Key(key), Value::Object(map)) => {
            map.remove(key);
        }
        (Seg::Index(index), Value::Array(arr)) if *index < arr.len() => {
            arr.remove(*index);
        }
        _ => {}
    }
}

/// `increment` (`sign == '+'`) / `decrement` (`sign == '-'`) of the number at `target`.
fn add_to(target: &mut Value, amount: &Number, sign: char) -> Result<(), PatchErrorKind> {
    let Value::Number(current) = target else {
        return Err(PatchErrorKind::NotANumber {
            found: type_name(target),
        });
    };
    // Integers that fit i64 stay integers; a u64 above i64::MAX counts as a float (`docs/wire.md`).
    let result = match (current.as_i64(), amount.as_i64()) {
        (Some(c), Some(a)) => {
            let r = if sign == '+' {
                c.checked_add(a)
            } else {
                c.checked_sub(a)
            };
            let r = r.ok_or(PatchErrorKind::Overflow {
                current: c,
                sign,
                amount: a,
            })?;
            Number::from(r)
        }
        _ => {
            let c = as_f64(current);
            let a = as_f64(amount);
            let r = if sign == '+' { c + a } else { c - a };
            Number::from_f64(r).ok_or(PatchErrorKind::NotFinite {
                current: c,
                sign,
                amount: a,
            })?
        }
    };
    *target = Value::Number(result);
    Ok(())
}

fn as_f64(n: &Number) -> f64 {
    // Every serde_json Number (without arbitrary_precision) converts to f64.
    n.as_f64().unwrap_or(f64::NAN)
}

/// How deep the state can get below the root after `op`: its path, plus one for an array
/// element it adds, plus its value's own depth. Ops that add nothing count their path alone.
fn nesting(op: &Op) -> usize {
    let (element, value) = match op {
        Op::Set { value, .. } | Op::LatticeMerge { value, .. } => (0, Some(value)),
        // merge_object's entries go one level below the path, as deep as the value's depth
        // minus its own object level: the same sum.
        Op::MergeObject { value, .. } => (0, Some(value)),
        Op::Append { value, .. } | Op::Insert { value, .. } => (1, Some(value)),
        Op::Delete { .. } | Op::Increment { .. } | Op::Decrement { .. } | Op::Remove { .. } => {
            (0, None)
        }
    };
    op.path().0.len() + element + value.map_or(0, depth)
}

fn apply_kind(state: &mut Value, op: &Op) -> Result<(), PatchErrorKind> {
    // Checked before anything changes: no accepted op can build a state deeper than the limit.
    let nesting = nesting(op);
    if nesting > MAX_STATE_DEPTH {
        return Err(PatchErrorKind::TooDeep {
            depth: nesting,
            limit: MAX_STATE_DEPTH,
        });
    }
    match op {
        Op::Set { path, value } | Op::LatticeMerge { path, value } => {
            *walk_create(state, &path.0)? = value.clone();
        }
        Op::Delete { path } => delete(state, &path.0),
        Op::Append { path, value } => {
            let target = walk_create(state, &path.0)?;
            if target.is_null() {
                *target = Value::Array(Vec::new());
            }
            match target {
                Value::Array(arr) => arr.push(value.clone()),
                other => {
                    return Err(PatchErrorKind::NotAnArray {
                        found: type_name(other),
                    });
                }
            }
        }
        Op::MergeObject { path, value } => {
            // Checked before walking so a bad value leaves the state untouched.
            let Value::Object(entries) = value else {
                return Err(PatchErrorKind::ValueNotAnObject {
                    found: type_name(value),
                });
            };
            let target = walk_create(state, &path.0)?;
            if target.is_null() {
                *target = Value::Object(Map::new());
            }
            match target {
                Value::Object(map) => {
                    for (k, v) in entries {
                        map.insert(k.clone(), v.clone());
                    }
                }
                other => {
                    return Err(PatchErrorKind::NotAnObject {
                        found: type_name(other),
                    });
                }
            }
        }
        Op::Increment { path, amount } => add_to(walk_existing(state, &path.0)?, amount, '+')?,
        Op::Decrement { path, amount } => add_to(walk_existing(state, &path.0)?, amount, '-')?,
        Op::Insert { path, index, value } => match walk_existing(state, &path.0)? {
            Value::Array(arr) => {
                if *index > arr.len() {
                    return Err(PatchErrorKind::IndexOutOfBounds {
                        index: *index,
                        len: arr.len(),
                    });
                }
                arr.insert(*index, value.clone());
            }
            other => {
                return Err(PatchErrorKind::NotAnArray {
                    found: type_name(other),
                });
            }
        },
        Op::Remove { path, value } => match walk_existing(state, &path.0)? {
            Value::Array(arr) => {
                // serde_json's Value equality distinguishes integer 1 from float 1.0.
                if let Some(pos) = arr.iter().position(|e| e == value) {
                    arr.remove(pos);
                }
            }
            other => {
                return Err(PatchErrorKind::NotAnArray {
                    found: type_name(other),
                });
            }
        },
    }
    Ok(())
}

/// Applies one op to `state`. On error the state may be partially modified (a creating op may
/// have made objects on the way before failing); callers work on a clone.
pub fn apply_op(state: &mut Value, op: &Op) -> Result<(), PatchError> {
    apply_kind(state, op).map_err(|kind| PatchError {
        op: op.name(),
        path: op.path().to_string(),
        kind,
    })
}

/// Applies all ops in order; on error returns (op_index, error). The state may be partially
/// modified on error — callers work on a clone.
pub fn apply_patch(state: &mut Value, patch: &Patch) -> Result<(), (usize, PatchError)> {
    for (i, op) in patch.ops.iter().enumerate() {
        apply_op(state, op).map_err(|e| (i, e))?;
    }
    Ok(())
}

/// `base` with every patch applied in order; the error carries (patch_index, op_index, error).
pub fn rebuild_state(
    base: &Value,
    patches: &[TrackedPatch],
) -> Result<Value, (usize, usize, PatchError)> {
    let mut state = base.clone();
    for (pi, tp) in patches.iter().enumerate() {
        apply_patch(&mut state, &tp.patch).map_err(|(oi, e)| (pi, oi, e))?;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Path;
    use serde_json::json;

    fn op(v: Value) -> Op {
        serde_json::from_value(v).expect("valid op")
    }

    /// Applies one op given as wire JSON to `state`, returning the new state.
    fn run(state: Value, o: Value) -> Result<Value, PatchError> {
        let mut s = state;
        apply_op(&mut s, &op(o))?;
        Ok(s)
    }

    fn kind(state: Value, o: Value) -> PatchErrorKind {
        run(state, o).expect_err("op should fail").kind
    }

    fn num_text(v: &Value) -> String {
        serde_json::to_string(v).unwrap()
    }

    // ---- depth limit -----------------------------------------------------------------------

    #[test]
    fn ops_that_would_nest_too_deep_fail_and_change_nothing() {
        use crate::model::limits::MAX_STATE_DEPTH;
        let long: Vec<String> = vec!["a".into(); MAX_STATE_DEPTH + 1];
        for o in [
            json!({"op": "set", "path": long, "value": 1}),
            json!({"op": "delete", "path": long}),
            json!({"op": "increment", "path": long, "amount": 1}),
            json!({"op": "set", "path": vec!["a"; 10_000], "value": 1}),
            json!({"op": "append", "path": vec!["a"; MAX_STATE_DEPTH], "value": 1}),
            json!({"op": "merge_object", "path": vec!["a"; MAX_STATE_DEPTH], "value": {"b": {}}}),
            json!({"op": "insert", "path": vec!["a"; MAX_STATE_DEPTH - 1], "index": 0, "value": [1]}),
        ] {
            let state = json!({"x": 1});
            let mut s = state.clone();
            let err = apply_op(&mut s, &op(o.clone())).expect_err("too deep");
            assert!(
                matches!(err.kind, PatchErrorKind::TooDeep { limit, .. } if limit == MAX_STATE_DEPTH),
                "{o}: {err}"
            );
            assert_eq!(s, state, "{o} changed the state");
        }
        // Exactly at the limit is fine.
        let mut s = json!({});
        apply_op(
            &mut s,
            &op(json!({"op": "set", "path": vec!["a"; MAX_STATE_DEPTH - 1], "value": {}})),
        )
        .unwrap();
        assert_eq!(crate::model::limits::depth(&s), MAX_STATE_DEPTH);
    }

    // ---- set -------------------------------------------------------------------------------

    #[test]
    fn set_writes_existing_and_new_keys() {
        let s = run(
            json!({"a": 1}),
            json!({"op": "set", "path": ["a"], "value": 2}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": 2}));
        let s = run(s, json!({"op": "set", "path": ["b"], "value": "x"})).unwrap();
        assert_eq!(s, json!({"a": 2, "b": "x"}));
    }

    #[test]
    fn set_creates_missing_objects_on_the_way() {
        let s = run(
            json!({}),
            json!({"op": "set", "path": ["a", "b", "c"], "value": true}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {"b": {"c": true}}}));
    }

    #[test]
    fn set_replaces_null_and_non_objects_met_by_a_key() {
        let s = run(
            json!({"a": 5}),
            json!({"op": "set", "path": ["a", "b"], "value": 1}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {"b": 1}}));
        let s = run(
            json!({"a": null}),
            json!({"op": "set", "path": ["a", "b"], "value": 1}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {"b": 1}}));
        let s = run(
            json!({"a": [1, 2]}),
            json!({"op": "set", "path": ["a", "b"], "value": 1}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {"b": 1}}));
        let s = run(
            json!({"a": "str"}),
            json!({"op": "set", "path": ["a", "b"], "value": 1}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {"b": 1}}));
        // A non-object root met by a key segment becomes an object too.
        let s = run(json!(3), json!({"op": "set", "path": ["k"], "value": 1})).unwrap();
        assert_eq!(s, json!({"k": 1}));
        let s = run(Value::Null, json!({"op": "set", "path": ["k"], "value": 1})).unwrap();
        assert_eq!(s, json!({"k": 1}));
    }

    #[test]
    fn set_at_root_replaces_root() {
        let s = run(
            json!({"a": 1}),
            json!({"op": "set", "path": [], "value": [1, 2]}),
        )
        .unwrap();
        assert_eq!(s, json!([1, 2]));
    }

    #[test]
    fn set_by_index_replaces_element() {
        let s = run(
            json!({"a": [1, {"b": 2}, 3]}),
            json!({"op": "set", "path": ["a", 1, "b"], "value": 9}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [1, {"b": 9}, 3]}));
        let s = run(s, json!({"op": "set", "path": ["a", 2], "value": "z"})).unwrap();
        assert_eq!(s, json!({"a": [1, {"b": 9}, "z"]}));
    }

    #[test]
    fn set_index_at_or_past_len_fails_no_append_by_index() {
        assert_eq!(
            kind(
                json!({"a": [1, 2]}),
                json!({"op": "set", "path": ["a", 2], "value": 3})
            ),
            PatchErrorKind::IndexOutOfBounds { index: 2, len: 2 }
        );
        assert_eq!(
            kind(
                json!({"a": []}),
                json!({"op": "set", "path": ["a", 0, "b"], "value": 3})
            ),
            PatchErrorKind::IndexOutOfBounds { index: 0, len: 0 }
        );
    }

    #[test]
    fn set_index_into_non_array_fails() {
        assert_eq!(
            kind(
                json!({"a": {"0": 1}}),
                json!({"op": "set", "path": ["a", 0], "value": 3})
            ),
            PatchErrorKind::IndexIntoNonArray {
                index: 0,
                found: "an object"
            }
        );
        assert_eq!(
            kind(
                json!({"a": 7}),
                json!({"op": "set", "path": ["a", 0, "x"], "value": 3})
            ),
            PatchErrorKind::IndexIntoNonArray {
                index: 0,
                found: "a number"
            }
        );
        // An index segment never creates: a missing key followed by an index fails.
        assert_eq!(
            kind(
                json!({}),
                json!({"op": "set", "path": ["a", 0], "value": 3})
            ),
            PatchErrorKind::IndexIntoNonArray {
                index: 0,
                found: "null"
            }
        );
        // Index at the root into a non-array.
        assert_eq!(
            kind(json!({}), json!({"op": "set", "path": [0], "value": 3})),
            PatchErrorKind::IndexIntoNonArray {
                index: 0,
                found: "an object"
            }
        );
    }

    #[test]
    fn set_value_kept_exactly() {
        let s = run(json!({}), json!({"op": "set", "path": ["f"], "value": 1.0})).unwrap();
        assert_eq!(num_text(&s["f"]), "1.0");
        assert_ne!(s["f"], json!(1));
    }

    #[test]
    fn error_display_names_op_path_and_reason() {
        let e = run(
            json!({"a": [1]}),
            json!({"op": "set", "path": ["a", 5], "value": 3}),
        )
        .unwrap_err();
        assert_eq!(e.op, "set");
        assert_eq!(e.path, "/a/5");
        assert_eq!(
            e.to_string(),
            "set at /a/5: index 5 is out of bounds for an array of length 1"
        );
        let e = run(
            json!(1),
            json!({"op": "increment", "path": ["x"], "amount": 1}),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "increment at /x: key \"x\" used on a number, which is not an object"
        );
        let e = run(json!([]), json!({"op": "append", "path": [], "value": 1}))
            .map(|_| ())
            .err();
        assert_eq!(e, None);
        let e = run(json!(1), json!({"op": "append", "path": [], "value": 1})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "append at /: target is a number, not an array"
        );
    }

    // ---- lattice_merge ---------------------------------------------------------------------

    #[test]
    fn lattice_merge_behaves_as_set() {
        let cases = [
            (json!({"a": {"x": 1}}), json!(["a"]), json!({"y": 2})),
            (json!({"a": 5}), json!(["a", "b"]), json!(1)),
            (json!({"a": [1, 2]}), json!(["a", 1]), json!("z")),
            (json!({"a": 1}), json!([]), json!([3])),
        ];
        for (state, path, value) in cases {
            let set = run(
                state.clone(),
                json!({"op": "set", "path": path, "value": value}),
            );
            let lm = run(
                state,
                json!({"op": "lattice_merge", "path": path, "value": value}),
            );
            assert_eq!(
                set,
                lm.clone().map_err(|mut e| {
                    e.op = "set";
                    e
                })
            );
            assert!(lm.is_ok());
        }
        // Not a merge: the object is replaced, not merged.
        let s = run(
            json!({"a": {"x": 1}}),
            json!({"op": "lattice_merge", "path": ["a"], "value": {"y": 2}}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {"y": 2}}));
        // Failures included.
        let e = run(
            json!({"a": [1]}),
            json!({"op": "lattice_merge", "path": ["a", 1], "value": 0}),
        )
        .unwrap_err();
        assert_eq!(e.op, "lattice_merge");
        assert_eq!(
            e.kind,
            PatchErrorKind::IndexOutOfBounds { index: 1, len: 1 }
        );
    }

    // ---- delete ----------------------------------------------------------------------------

    #[test]
    fn delete_key() {
        let s = run(
            json!({"a": {"b": 1, "c": 2}}),
            json!({"op": "delete", "path": ["a", "b"]}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {"c": 2}}));
    }

    #[test]
    fn delete_root_makes_null() {
        let s = run(json!({"a": 1}), json!({"op": "delete", "path": []})).unwrap();
        assert_eq!(s, Value::Null);
    }

    #[test]
    fn delete_missing_is_noop() {
        let st = json!({"a": {"b": [1, 2]}, "n": 3});
        for path in [
            json!(["x"]),
            json!(["x", "y"]),
            json!(["a", "z"]),
            json!(["a", "b", 5]),
            json!(["a", "b", "k"]),
            json!(["n", "k"]),
            json!(["n", 0]),
            json!(["a", 0]),
            json!(["a", "b", 9, "q"]),
        ] {
            let s = run(st.clone(), json!({"op": "delete", "path": path})).unwrap();
            assert_eq!(s, st, "path {path}");
        }
    }

    #[test]
    fn delete_array_element_shifts_later_elements() {
        let s = run(
            json!({"a": [10, 20, 30, 40]}),
            json!({"op": "delete", "path": ["a", 1]}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [10, 30, 40]}));
        let s = run(s, json!({"op": "delete", "path": ["a", 1]})).unwrap();
        assert_eq!(s, json!({"a": [10, 40]}));
    }

    // ---- append ----------------------------------------------------------------------------

    #[test]
    fn append_pushes() {
        let s = run(
            json!({"a": [1]}),
            json!({"op": "append", "path": ["a"], "value": {"x": 2}}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [1, {"x": 2}]}));
    }

    #[test]
    fn append_to_missing_or_null_creates_array() {
        let s = run(
            json!({}),
            json!({"op": "append", "path": ["a", "b"], "value": 1}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {"b": [1]}}));
        let s = run(
            json!({"a": null}),
            json!({"op": "append", "path": ["a"], "value": 1}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [1]}));
        let s = run(Value::Null, json!({"op": "append", "path": [], "value": 1})).unwrap();
        assert_eq!(s, json!([1]));
    }

    #[test]
    fn append_into_nested_array_by_index() {
        let s = run(
            json!({"a": [[1], [2]]}),
            json!({"op": "append", "path": ["a", 1], "value": 3}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [[1], [2, 3]]}));
    }

    #[test]
    fn append_to_non_array_fails() {
        assert_eq!(
            kind(
                json!({"a": 5}),
                json!({"op": "append", "path": ["a"], "value": 1})
            ),
            PatchErrorKind::NotAnArray { found: "a number" }
        );
        assert_eq!(
            kind(
                json!({"a": {}}),
                json!({"op": "append", "path": ["a"], "value": 1})
            ),
            PatchErrorKind::NotAnArray { found: "an object" }
        );
        assert_eq!(
            kind(
                json!({"a": "s"}),
                json!({"op": "append", "path": ["a"], "value": 1})
            ),
            PatchErrorKind::NotAnArray { found: "a string" }
        );
    }

    // ---- merge_object ----------------------------------------------------------------------

    #[test]
    fn merge_object_shallow_inserts() {
        let s = run(
            json!({"a": {"x": 1, "n": {"deep": 1}}}),
            json!({"op": "merge_object", "path": ["a"], "value": {"y": 2, "n": {"other": 2}}}),
        )
        .unwrap();
        // Shallow: `n` is replaced, not merged.
        assert_eq!(s, json!({"a": {"x": 1, "y": 2, "n": {"other": 2}}}));
    }

    #[test]
    fn merge_object_missing_or_null_target_becomes_object() {
        let s = run(
            json!({}),
            json!({"op": "merge_object", "path": ["a", "b"], "value": {"y": 2}}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {"b": {"y": 2}}}));
        let s = run(
            json!({"a": null}),
            json!({"op": "merge_object", "path": ["a"], "value": {}}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": {}}));
        let s = run(
            Value::Null,
            json!({"op": "merge_object", "path": [], "value": {"k": 1}}),
        )
        .unwrap();
        assert_eq!(s, json!({"k": 1}));
    }

    #[test]
    fn merge_object_non_object_value_fails() {
        let e = run(
            json!({"a": {}}),
            json!({"op": "merge_object", "path": ["a"], "value": [1]}),
        )
        .unwrap_err();
        assert_eq!(
            e.kind,
            PatchErrorKind::ValueNotAnObject { found: "an array" }
        );
        assert_eq!(e.op, "merge_object");
        assert_eq!(
            kind(
                json!({}),
                json!({"op": "merge_object", "path": ["a"], "value": null})
            ),
            PatchErrorKind::ValueNotAnObject { found: "null" }
        );
    }

    #[test]
    fn merge_object_non_object_target_fails() {
        assert_eq!(
            kind(
                json!({"a": [1]}),
                json!({"op": "merge_object", "path": ["a"], "value": {"k": 1}})
            ),
            PatchErrorKind::NotAnObject { found: "an array" }
        );
        assert_eq!(
            kind(
                json!({"a": 1}),
                json!({"op": "merge_object", "path": ["a"], "value": {"k": 1}})
            ),
            PatchErrorKind::NotAnObject { found: "a number" }
        );
    }

    // ---- increment / decrement -------------------------------------------------------------

    #[test]
    fn increment_int_stays_int() {
        let s = run(
            json!({"n": 5}),
            json!({"op": "increment", "path": ["n"], "amount": 2}),
        )
        .unwrap();
        assert_eq!(s, json!({"n": 7}));
        assert!(s["n"].is_i64());
        assert_eq!(num_text(&s["n"]), "7");
        let s = run(s, json!({"op": "decrement", "path": ["n"], "amount": 10})).unwrap();
        assert_eq!(s["n"].as_i64(), Some(-3));
        assert_eq!(num_text(&s["n"]), "-3");
    }

    #[test]
    fn increment_int_overflow_fails_never_wraps() {
        let e = run(
            json!({"n": i64::MAX}),
            json!({"op": "increment", "path": ["n"], "amount": 1}),
        )
        .unwrap_err();
        assert_eq!(
            e.kind,
            PatchErrorKind::Overflow {
                current: i64::MAX,
                sign: '+',
                amount: 1
            }
        );
        assert_eq!(
            kind(
                json!({"n": i64::MIN}),
                json!({"op": "decrement", "path": ["n"], "amount": 1})
            ),
            PatchErrorKind::Overflow {
                current: i64::MIN,
                sign: '-',
                amount: 1
            }
        );
        // 0 - i64::MIN overflows too.
        assert!(matches!(
            kind(
                json!({"n": 0}),
                json!({"op": "decrement", "path": ["n"], "amount": i64::MIN})
            ),
            PatchErrorKind::Overflow { .. }
        ));
        // Near the edge still works.
        let s = run(
            json!({"n": i64::MAX - 1}),
            json!({"op": "increment", "path": ["n"], "amount": 1}),
        )
        .unwrap();
        assert_eq!(s["n"].as_i64(), Some(i64::MAX));
    }

    #[test]
    fn increment_with_float_gives_float_even_when_whole() {
        let s = run(
            json!({"n": 5}),
            json!({"op": "increment", "path": ["n"], "amount": 2.0}),
        )
        .unwrap();
        assert!(s["n"].is_f64());
        assert_eq!(num_text(&s["n"]), "7.0");
        assert_ne!(s["n"], json!(7));
        let s = run(
            json!({"n": 5.0}),
            json!({"op": "increment", "path": ["n"], "amount": 2}),
        )
        .unwrap();
        assert_eq!(num_text(&s["n"]), "7.0");
        let s = run(
            json!({"n": 5.5}),
            json!({"op": "decrement", "path": ["n"], "amount": 0.5}),
        )
        .unwrap();
        assert_eq!(num_text(&s), r#"{"n":5.0}"#);
    }

    #[test]
    fn increment_float_exactness() {
        let s = run(
            json!({"n": 0.1}),
            json!({"op": "increment", "path": ["n"], "amount": 0.2}),
        )
        .unwrap();
        assert_eq!(s["n"].as_f64(), Some(0.1 + 0.2));
        assert_eq!(num_text(&s["n"]), "0.30000000000000004");
        let back: Value = serde_json::from_str(&num_text(&s)).unwrap();
        assert_eq!(
            back["n"].as_f64().unwrap().to_bits(),
            (0.1f64 + 0.2).to_bits()
        );
    }

    #[test]
    fn increment_result_must_be_finite() {
        let e = run(
            json!({"n": 1.7e308}),
            json!({"op": "increment", "path": ["n"], "amount": 1.7e308}),
        )
        .unwrap_err();
        assert!(matches!(e.kind, PatchErrorKind::NotFinite { .. }), "{e}");
        assert!(matches!(
            kind(
                json!({"n": -1.7e308}),
                json!({"op": "decrement", "path": ["n"], "amount": 1.7e308})
            ),
            PatchErrorKind::NotFinite { .. }
        ));
    }

    #[test]
    fn increment_u64_above_i64_is_float_arithmetic() {
        let mut s = json!({"n": u64::MAX});
        apply_op(
            &mut s,
            &op(json!({"op": "increment", "path": ["n"], "amount": 1})),
        )
        .unwrap();
        assert!(s["n"].is_f64());
        assert_eq!(s["n"].as_f64(), Some(u64::MAX as f64 + 1.0));
        // A u64 amount that fits i64 is an integer.
        let amount = Number::from(5u64);
        let mut s = json!({"n": 1});
        apply_op(
            &mut s,
            &Op::Increment {
                path: Path(vec![Seg::Key("n".into())]),
                amount,
            },
        )
        .unwrap();
        assert!(s["n"].is_i64());
        assert_eq!(s["n"], json!(6));
    }

    #[test]
    fn increment_missing_path_is_not_found() {
        assert_eq!(
            kind(
                json!({}),
                json!({"op": "increment", "path": ["n"], "amount": 1})
            ),
            PatchErrorKind::PathNotFound
        );
        assert_eq!(
            kind(
                json!({"a": {}}),
                json!({"op": "decrement", "path": ["a", "n"], "amount": 1})
            ),
            PatchErrorKind::PathNotFound
        );
        assert_eq!(
            kind(
                json!({}),
                json!({"op": "increment", "path": ["a", "n"], "amount": 1})
            ),
            PatchErrorKind::PathNotFound
        );
        assert_eq!(
            kind(
                json!({"a": [1]}),
                json!({"op": "increment", "path": ["a", 1], "amount": 1})
            ),
            PatchErrorKind::IndexOutOfBounds { index: 1, len: 1 }
        );
    }

    #[test]
    fn increment_null_is_type_error_not_not_found() {
        assert_eq!(
            kind(
                json!({"n": null}),
                json!({"op": "increment", "path": ["n"], "amount": 1})
            ),
            PatchErrorKind::NotANumber { found: "null" }
        );
        // A null on the way is also a type error.
        assert_eq!(
            kind(
                json!({"a": null}),
                json!({"op": "increment", "path": ["a", "n"], "amount": 1})
            ),
            PatchErrorKind::KeyIntoNonObject {
                key: "n".into(),
                found: "null"
            }
        );
    }

    #[test]
    fn increment_non_number_fails_and_does_not_create() {
        assert_eq!(
            kind(
                json!({"n": "5"}),
                json!({"op": "increment", "path": ["n"], "amount": 1})
            ),
            PatchErrorKind::NotANumber { found: "a string" }
        );
        assert_eq!(
            kind(
                json!({"n": [1]}),
                json!({"op": "decrement", "path": ["n"], "amount": 1})
            ),
            PatchErrorKind::NotANumber { found: "an array" }
        );
        assert_eq!(
            kind(
                json!({"n": 1}),
                json!({"op": "increment", "path": ["n", 0], "amount": 1})
            ),
            PatchErrorKind::IndexIntoNonArray {
                index: 0,
                found: "a number"
            }
        );
    }

    #[test]
    fn increment_at_root() {
        let s = run(
            json!(1),
            json!({"op": "increment", "path": [], "amount": 1}),
        )
        .unwrap();
        assert_eq!(s, json!(2));
    }

    // ---- insert ----------------------------------------------------------------------------

    #[test]
    fn insert_at_start_middle_and_end() {
        let s = run(
            json!({"a": [1, 3]}),
            json!({"op": "insert", "path": ["a"], "index": 1, "value": 2}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [1, 2, 3]}));
        let s = run(
            s,
            json!({"op": "insert", "path": ["a"], "index": 0, "value": 0}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [0, 1, 2, 3]}));
        let s = run(
            s,
            json!({"op": "insert", "path": ["a"], "index": 4, "value": 4}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [0, 1, 2, 3, 4]}));
    }

    #[test]
    fn insert_index_past_len_fails() {
        assert_eq!(
            kind(
                json!({"a": [1]}),
                json!({"op": "insert", "path": ["a"], "index": 2, "value": 2})
            ),
            PatchErrorKind::IndexOutOfBounds { index: 2, len: 1 }
        );
    }

    #[test]
    fn insert_needs_existing_array() {
        assert_eq!(
            kind(
                json!({}),
                json!({"op": "insert", "path": ["a"], "index": 0, "value": 2})
            ),
            PatchErrorKind::PathNotFound
        );
        assert_eq!(
            kind(
                json!({"a": null}),
                json!({"op": "insert", "path": ["a"], "index": 0, "value": 2})
            ),
            PatchErrorKind::NotAnArray { found: "null" }
        );
        assert_eq!(
            kind(
                json!({"a": {}}),
                json!({"op": "insert", "path": ["a"], "index": 0, "value": 2})
            ),
            PatchErrorKind::NotAnArray { found: "an object" }
        );
    }

    // ---- remove ----------------------------------------------------------------------------

    #[test]
    fn remove_first_equal_element() {
        let s = run(
            json!({"a": [1, {"k": 2}, 1, 3]}),
            json!({"op": "remove", "path": ["a"], "value": 1}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [{"k": 2}, 1, 3]}));
        let s = run(s, json!({"op": "remove", "path": ["a"], "value": {"k": 2}})).unwrap();
        assert_eq!(s, json!({"a": [1, 3]}));
    }

    #[test]
    fn remove_int_vs_float_is_noop() {
        // serde_json's PartialEq distinguishes integer 1 from float 1.0.
        assert_ne!(json!(1), json!(1.0));
        let s = run(
            json!({"a": [1, 2]}),
            json!({"op": "remove", "path": ["a"], "value": 1.0}),
        )
        .unwrap();
        assert_eq!(num_text(&s), r#"{"a":[1,2]}"#);
        let s = run(
            json!({"a": [1.0, 2]}),
            json!({"op": "remove", "path": ["a"], "value": 1}),
        )
        .unwrap();
        assert_eq!(num_text(&s), r#"{"a":[1.0,2]}"#);
        let s = run(
            json!({"a": [1.0, 1]}),
            json!({"op": "remove", "path": ["a"], "value": 1}),
        )
        .unwrap();
        assert_eq!(num_text(&s), r#"{"a":[1.0]}"#);
    }

    #[test]
    fn remove_absent_is_noop() {
        let s = run(
            json!({"a": [1, 2]}),
            json!({"op": "remove", "path": ["a"], "value": 9}),
        )
        .unwrap();
        assert_eq!(s, json!({"a": [1, 2]}));
    }

    #[test]
    fn remove_needs_existing_array() {
        assert_eq!(
            kind(
                json!({}),
                json!({"op": "remove", "path": ["a"], "value": 1})
            ),
            PatchErrorKind::PathNotFound
        );
        assert_eq!(
            kind(
                json!({"a": "x"}),
                json!({"op": "remove", "path": ["a"], "value": 1})
            ),
            PatchErrorKind::NotAnArray { found: "a string" }
        );
        assert_eq!(
            kind(
                json!({"a": null}),
                json!({"op": "remove", "path": ["a"], "value": 1})
            ),
            PatchErrorKind::NotAnArray { found: "null" }
        );
    }

    // ---- patches and rebuild ---------------------------------------------------------------

    fn patch(ops: Value) -> Patch {
        serde_json::from_value(json!({ "ops": ops })).unwrap()
    }

    fn tracked(ops: Value) -> TrackedPatch {
        serde_json::from_value(json!({ "patch": { "ops": ops } })).unwrap()
    }

    #[test]
    fn apply_patch_in_order() {
        let mut s = json!({});
        apply_patch(
            &mut s,
            &patch(json!([
                {"op": "set", "path": ["n"], "value": 1},
                {"op": "increment", "path": ["n"], "amount": 2},
                {"op": "append", "path": ["l"], "value": "a"},
                {"op": "insert", "path": ["l"], "index": 0, "value": "b"},
            ])),
        )
        .unwrap();
        assert_eq!(s, json!({"n": 3, "l": ["b", "a"]}));
    }

    #[test]
    fn apply_patch_reports_failing_op_index() {
        let mut s = json!({});
        let (i, e) = apply_patch(
            &mut s,
            &patch(json!([
                {"op": "set", "path": ["n"], "value": 1},
                {"op": "delete", "path": ["zz"]},
                {"op": "increment", "path": ["m"], "amount": 2},
            ])),
        )
        .unwrap_err();
        assert_eq!(i, 2);
        assert_eq!(e.op, "increment");
        assert_eq!(e.path, "/m");
        assert_eq!(e.kind, PatchErrorKind::PathNotFound);
    }

    #[test]
    fn rebuild_state_applies_all_patches_without_touching_base() {
        let base = json!({"n": 1});
        let patches = vec![
            tracked(json!([{"op": "increment", "path": ["n"], "amount": 1}])),
            tracked(json!([
                {"op": "set", "path": ["s"], "value": "x"},
                {"op": "increment", "path": ["n"], "amount": 0.5},
            ])),
        ];
        let s = rebuild_state(&base, &patches).unwrap();
        assert_eq!(s, json!({"n": 2.5, "s": "x"}));
        assert_eq!(base, json!({"n": 1}));
        assert_eq!(rebuild_state(&base, &[]).unwrap(), base);
    }

    #[test]
    fn rebuild_state_reports_patch_and_op_index() {
        let patches = vec![
            tracked(json!([{"op": "set", "path": ["a"], "value": [1]}])),
            tracked(json!([
                {"op": "append", "path": ["a"], "value": 2},
                {"op": "set", "path": ["a", 5], "value": 0},
            ])),
        ];
        let (pi, oi, e) = rebuild_state(&json!({}), &patches).unwrap_err();
        assert_eq!((pi, oi), (1, 1));
        assert_eq!(
            e.kind,
            PatchErrorKind::IndexOutOfBounds { index: 5, len: 2 }
        );
    }
}
