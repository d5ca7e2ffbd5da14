//! Property tests (proptest): the parsers and the apply rules against simple reference models,
//! on thousands of generated inputs per run (`PROPTEST_CASES` raises it; a failure is shrunk
//! to a minimal case and its seed saved under `tests/it/proptest-regressions/` to replay).
//!
//! - ChangeSet parsing: any JSON (valid deltas, mutated ones, junk, truncated text) parses or is
//!   refused deterministically, never panics, and what parses serialises and parses back equal.
//! - Applying deltas: a random sequence of deltas (every op, paths that exist and that do not,
//!   snapshots, duplicate message ids) applied with the gateway's rules gives exactly what an
//!   independent, deliberately naive model of WIRE.md gives: the same accept/reject decision
//!   (naming the same patch and op), the same messages, state, base state and patches.
//! - Thread ids and their encoding: the id rule as a predicate; the encoding is injective,
//!   round-trips, is a single NATS subject token, and decoding is canonical.
//! - `Last-Event-ID`, `after` and `If-Match`: exactly the documented forms are accepted.

use proptest::prelude::*;
use serde_json::{Number, Value, json};
use threadgate::http::events::{EventsParams, parse_last_event_id, position};
use threadgate::http::extract::{MAX_VERSION, parse_if_match, parse_json, parse_query};
use threadgate::id::{MAX_ID_LEN, ThreadId};
use threadgate::model::{ChangeSet, Thread, apply_delta, rebuild_state};
use threadgate::store::Expect;

// ---- generators ------------------------------------------------------------------------------

fn key() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(str::to_owned)
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-3i64..4).prop_map(Value::from),
        prop_oneof![Just(i64::MAX - 1), Just(i64::MIN + 1)].prop_map(Value::from),
        prop_oneof![Just(0.5), Just(1.0), Just(-2.5), Just(1e308)]
            .prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
        prop_oneof![Just("x"), Just("y")].prop_map(Value::from),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn path() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(
        prop_oneof![key().prop_map(Value::from), (0u64..3).prop_map(Value::from)],
        0..4,
    )
}

fn amount() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-2i64..3).prop_map(Value::from),
        Just(Value::from(i64::MAX)),
        prop_oneof![Just(0.5), Just(1e308)]
            .prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
    ]
}

/// One op as wire JSON, with a path of random segments (for the parsing test).
fn op() -> impl Strategy<Value = Value> {
    (op_spec(), path()).prop_map(|(spec, p)| spec.to_json(p))
}

/// An op whose path is chosen when it is applied, from the state it applies to, so most ops
/// hit something that exists (and some miss on purpose).
#[derive(Debug, Clone)]
struct OpSpec {
    kind: u8,
    path: Vec<u8>,
    value: Value,
    amount: Value,
    index: usize,
    /// Picks the element a `remove` removes (one that is there, 3 in 4).
    pick: u8,
}

const OPS: [&str; 9] = [
    "set",
    "delete",
    "append",
    "merge_object",
    "increment",
    "decrement",
    "insert",
    "remove",
    "lattice_merge",
];

impl OpSpec {
    fn to_json(&self, path: Vec<Value>) -> Value {
        let mut op = json!({"op": OPS[self.kind as usize], "path": path});
        match OPS[self.kind as usize] {
            "delete" => {}
            "increment" | "decrement" => op["amount"] = self.amount.clone(),
            "insert" => {
                op["index"] = self.index.into();
                op["value"] = self.value.clone();
            }
            _ => op["value"] = self.value.clone(),
        }
        op
    }

    /// The op against `state`: each path byte picks an existing key or index (3 in 4), or a
    /// key that may not exist, or an index one past the end.
    fn resolve(&self, state: &Value) -> Value {
        let mut cur = Some(state);
        let mut path = Vec::new();
        for &n in &self.path {
            let pick = n as usize;
            match cur {
                Some(Value::Object(m)) if !m.is_empty() && !pick.is_multiple_of(4) => {
                    let k = m.keys().nth(pick % m.len()).unwrap().clone();
                    cur = m.get(&k);
                    path.push(Value::from(k));
                }
                Some(Value::Array(a)) if !pick.is_multiple_of(4) => {
                    let i = pick % (a.len() + 1);
                    cur = a.get(i);
                    path.push(Value::from(i));
                }
                _ => {
                    let k = ["a", "b", "c"][pick % 3];
                    cur = cur.and_then(|c| c.get(k));
                    path.push(Value::from(k));
                }
            }
        }
        // An increment or decrement goes on down to a number, when there is one to reach.
        if matches!(OPS[self.kind as usize], "increment" | "decrement") {
            while let Some(c @ (Value::Object(_) | Value::Array(_))) = cur {
                let child = match c {
                    Value::Object(m) => m
                        .iter()
                        .find(|(_, v)| v.is_number() || v.is_object() || v.is_array())
                        .map(|(k, v)| (Value::from(k.clone()), v)),
                    Value::Array(a) => a
                        .iter()
                        .enumerate()
                        .find(|(_, v)| v.is_number() || v.is_object() || v.is_array())
                        .map(|(i, v)| (Value::from(i), v)),
                    _ => None,
                };
                let Some((seg, v)) = child else { break };
                path.push(seg);
                cur = Some(v);
            }
        }
        let mut op = self.clone();
        if let Some(Value::Array(a)) = cur {
            op.index = self.index % (a.len() + 2);
            // `remove` of an element that is there, most of the time.
            if !a.is_empty() && !self.pick.is_multiple_of(4) {
                op.value = a[self.pick as usize % a.len()].clone();
            }
        }
        op.to_json(path)
    }
}

fn op_spec() -> impl Strategy<Value = OpSpec> {
    (
        0u8..9,
        prop::collection::vec(any::<u8>(), 0..4),
        value(),
        amount(),
        0usize..6,
        any::<u8>(),
    )
        .prop_map(|(kind, path, value, amount, index, pick)| OpSpec {
            kind,
            path,
            value,
            amount,
            index,
            pick,
        })
}

fn message() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop_oneof![Just("m1"), Just("m2"), Just("m3")]),
        "[a-z]{0,3}",
    )
        .prop_map(|(id, content)| match id {
            Some(id) => json!({"id": id, "role": "assistant", "content": content}),
            None => json!({"role": "user", "content": content}),
        })
}

fn snapshot() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        8 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => value().prop_map(Some),
    ]
}

fn wire_delta(messages: Vec<Value>, patches: Vec<Value>, snapshot: Option<Value>) -> Value {
    let mut d = json!({"run_id": "r", "reason": "AssistantTurnCommitted",
        "messages": messages, "patches": patches});
    if let Some(s) = snapshot {
        d["snapshot"] = s;
    }
    d
}

/// A delta as wire JSON: messages with ids from a small pool (duplicates likely), patches of
/// ops with random paths, sometimes a snapshot (or a `null` one).
fn delta() -> impl Strategy<Value = Value> {
    let patch = prop::collection::vec(op(), 0..4).prop_map(|ops| json!({"patch": {"ops": ops}}));
    (
        prop::collection::vec(message(), 0..3),
        prop::collection::vec(patch, 0..3),
        snapshot(),
    )
        .prop_map(|(m, p, s)| wire_delta(m, p, s))
}

/// A delta whose ops are resolved against the state they will apply to.
#[derive(Debug, Clone)]
struct DeltaSpec {
    messages: Vec<Value>,
    patches: Vec<Vec<OpSpec>>,
    snapshot: Option<Value>,
}

impl DeltaSpec {
    fn resolve(&self, state: &Value) -> Value {
        let base = match &self.snapshot {
            Some(s) if !s.is_null() => s,
            _ => state,
        };
        let patches = self
            .patches
            .iter()
            .map(|ops| json!({"patch": {"ops": ops.iter().map(|o| o.resolve(base)).collect::<Vec<_>>()}}))
            .collect();
        wire_delta(self.messages.clone(), patches, self.snapshot.clone())
    }
}

fn delta_spec() -> impl Strategy<Value = DeltaSpec> {
    (
        prop::collection::vec(message(), 0..3),
        prop::collection::vec(prop::collection::vec(op_spec(), 1..3), 0..3),
        snapshot(),
    )
        .prop_map(|(messages, patches, snapshot)| DeltaSpec {
            messages,
            patches,
            snapshot,
        })
}

/// The state every generated thread starts from: something of each kind to hit.
fn initial_state() -> Value {
    json!({"a": [1, 2.5, "x", 1, [0], {"b": 1}], "b": {"a": 1, "c": {}, "b": [true, 1.0, true]}, "c": 3})
}

// ---- the reference model of WIRE.md ----------------------------------------------------------

/// Why an op failed (the model only needs "it failed").
struct Fail;

enum Seg {
    Key(String),
    Index(usize),
}

fn segs(path: &Value) -> Vec<Seg> {
    path.as_array()
        .unwrap()
        .iter()
        .map(|s| match s {
            Value::String(k) => Seg::Key(k.clone()),
            n => Seg::Index(n.as_u64().unwrap() as usize),
        })
        .collect()
}

/// The creating walk: keys turn anything that is not an object into `{}` and missing keys
/// into `null`; indexes must be in bounds of an array.
fn slot_create<'a>(mut cur: &'a mut Value, path: &[Seg]) -> Result<&'a mut Value, Fail> {
    for seg in path {
        cur = match seg {
            Seg::Key(k) => {
                if !cur.is_object() {
                    *cur = json!({});
                }
                cur.as_object_mut()
                    .unwrap()
                    .entry(k.clone())
                    .or_insert(Value::Null)
            }
            Seg::Index(i) => match cur {
                Value::Array(a) if *i < a.len() => &mut a[*i],
                _ => return Err(Fail),
            },
        };
    }
    Ok(cur)
}

/// The non-creating walk: every segment must exist.
fn slot_existing<'a>(mut cur: &'a mut Value, path: &[Seg]) -> Result<&'a mut Value, Fail> {
    for seg in path {
        cur = match (seg, cur) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k).ok_or(Fail)?,
            (Seg::Index(i), Value::Array(a)) if *i < a.len() => &mut a[*i],
            _ => return Err(Fail),
        };
    }
    Ok(cur)
}

fn arith(target: &mut Value, amount: &Value, sign: i64) -> Result<(), Fail> {
    let Value::Number(n) = target else {
        return Err(Fail);
    };
    let a = amount.as_number().unwrap();
    let out = match (n.as_i64(), a.as_i64()) {
        (Some(x), Some(y)) => {
            let r = if sign > 0 {
                x.checked_add(y)
            } else {
                x.checked_sub(y)
            };
            Value::from(r.ok_or(Fail)?)
        }
        _ => {
            let (x, y) = (n.as_f64().unwrap(), a.as_f64().unwrap());
            let r = if sign > 0 { x + y } else { x - y };
            Value::Number(Number::from_f64(r).ok_or(Fail)?)
        }
    };
    *target = out;
    Ok(())
}

fn model_op(state: &mut Value, op: &Value) -> Result<(), Fail> {
    let path = segs(&op["path"]);
    let v = &op["value"];
    match op["op"].as_str().unwrap() {
        "set" | "lattice_merge" => *slot_create(state, &path)? = v.clone(),
        "delete" => {
            let Some((last, parents)) = path.split_last() else {
                *state = Value::Null;
                return Ok(());
            };
            if let Ok(parent) = slot_existing(state, parents) {
                match (last, parent) {
                    (Seg::Key(k), Value::Object(m)) => {
                        m.remove(k);
                    }
                    (Seg::Index(i), Value::Array(a)) if *i < a.len() => {
                        a.remove(*i);
                    }
                    _ => {}
                }
            }
        }
        "append" => {
            let t = slot_create(state, &path)?;
            if t.is_null() {
                *t = json!([]);
            }
            t.as_array_mut().ok_or(Fail)?.push(v.clone());
        }
        "merge_object" => {
            let entries = v.as_object().ok_or(Fail)?;
            let t = slot_create(state, &path)?;
            if t.is_null() {
                *t = json!({});
            }
            let m = t.as_object_mut().ok_or(Fail)?;
            for (k, x) in entries {
                m.insert(k.clone(), x.clone());
            }
        }
        "increment" => arith(slot_existing(state, &path)?, &op["amount"], 1)?,
        "decrement" => arith(slot_existing(state, &path)?, &op["amount"], -1)?,
        "insert" => {
            let a = slot_existing(state, &path)?.as_array_mut().ok_or(Fail)?;
            let i = op["index"].as_u64().unwrap() as usize;
            if i > a.len() {
                return Err(Fail);
            }
            a.insert(i, v.clone());
        }
        "remove" => {
            let a = slot_existing(state, &path)?.as_array_mut().ok_or(Fail)?;
            if let Some(pos) = a.iter().position(|x| x == v) {
                a.remove(pos);
            }
        }
        other => panic!("the generator made op {other}"),
    }
    Ok(())
}

/// The model's thread.
#[derive(Debug, Clone, PartialEq)]
struct Model {
    messages: Vec<(Option<String>, String)>,
    base: Value,
    patches: usize,
    current: Value,
}

impl Model {
    /// Applies a delta; on failure, the (patch, op) that failed and nothing changed.
    fn apply(&mut self, d: &Value) -> Result<(), (usize, usize)> {
        let snapshot = d.get("snapshot").filter(|s| !s.is_null());
        let mut state = snapshot.cloned().unwrap_or_else(|| self.current.clone());
        for (pi, p) in d["patches"].as_array().unwrap().iter().enumerate() {
            for (oi, op) in p["patch"]["ops"].as_array().unwrap().iter().enumerate() {
                model_op(&mut state, op).map_err(|_| (pi, oi))?;
            }
        }
        if let Some(s) = snapshot {
            self.base = s.clone();
            self.patches = 0;
        }
        for m in d["messages"].as_array().unwrap() {
            let id = m.get("id").and_then(Value::as_str).map(str::to_owned);
            if id.is_some() && self.messages.iter().any(|(i, _)| *i == id) {
                continue;
            }
            self.messages
                .push((id, m["content"].as_str().unwrap().to_owned()));
        }
        self.patches += d["patches"].as_array().unwrap().len();
        self.current = state;
        Ok(())
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// A random delta sequence: the gateway's apply equals the model, decision by decision.
    #[test]
    fn apply_equals_the_reference_model(specs in prop::collection::vec(delta_spec(), 1..12)) {
        let mut thread = Thread::new("t");
        thread.state = initial_state();
        let mut state = initial_state();
        let mut model = Model {
            messages: vec![],
            base: initial_state(),
            patches: 0,
            current: initial_state(),
        };
        let mut deltas = Vec::new();
        for spec in &specs {
            let d = spec.resolve(&model.current);
            deltas.push(d.clone());
            let d = &d;
            let parsed: ChangeSet = serde_json::from_value(d.clone()).expect("generated deltas parse");
            let before = (thread.clone(), state.clone());
            let got = apply_delta(&mut thread, &mut state, &parsed);
            let want = model.apply(d);
            match (&got, &want) {
                (Ok(_), Ok(())) => {}
                (Err(threadgate::model::DeltaError::Patch { patch, op, .. }), Err((p, o))) => {
                    prop_assert_eq!((*patch, *op), (*p, *o), "failing op of {}", d);
                    prop_assert_eq!(&(thread.clone(), state.clone()), &before, "a rejected delta changed the thread");
                }
                _ => prop_assert!(false, "gateway {:?} vs model {:?} for {}", got.as_ref().map(|_| ()), want, d),
            }
            let messages: Vec<(Option<String>, String)> =
                thread.messages.iter().map(|m| (m.id.clone(), m.content.clone())).collect();
            prop_assert_eq!(&messages, &model.messages);
            prop_assert_eq!(&state, &model.current);
            prop_assert_eq!(&thread.state, &model.base);
            prop_assert_eq!(thread.patches.len(), model.patches);
            // The thread always rebuilds to the state it holds.
            prop_assert_eq!(rebuild_state(&thread.state, &thread.patches).ok(), Some(state.clone()));
        }
        // Deterministic: the same sequence again gives the same thread.
        let mut again = Thread::new("t");
        again.state = initial_state();
        let mut again_state = initial_state();
        for d in &deltas {
            let parsed: ChangeSet = serde_json::from_value(d.clone()).unwrap();
            let _ = apply_delta(&mut again, &mut again_state, &parsed);
        }
        prop_assert_eq!(again, thread);
        prop_assert_eq!(again_state, state);
    }

    /// Valid, mutated and junk deltas: parsing never panics, is deterministic, and what parses
    /// round-trips.
    #[test]
    fn changeset_parsing_is_total_and_round_trips(
        base in delta(),
        field in prop_oneof![Just("run_id"), Just("reason"), Just("messages"), Just("patches"),
            Just("snapshot"), Just("run_meta"), Just("actions"), Just("extra")],
        junk in value(),
        mutate in 0u8..4,
        cut in 0usize..400,
    ) {
        let mut d = base;
        match mutate {
            0 => {}
            1 => { d[field] = junk; }
            2 => { d.as_object_mut().unwrap().remove(field); }
            _ => { d["patches"] = json!([{"patch": {"ops": [{"op": field, "path": []}]}}]); }
        }
        let text = serde_json::to_vec(&d).unwrap();
        for bytes in [&text[..], &text[..cut.min(text.len())]] {
            let first = parse_json::<ChangeSet>(bytes);
            let second = parse_json::<ChangeSet>(bytes);
            prop_assert_eq!(format!("{first:?}"), format!("{second:?}"));
            if let Ok(parsed) = first {
                let again: ChangeSet = parse_json(&serde_json::to_vec(&parsed).unwrap()).unwrap();
                prop_assert_eq!(again, parsed);
            }
        }
    }

    /// Arbitrary bytes never make the parser panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_json::<ChangeSet>(&bytes);
        let _ = parse_json::<Value>(&bytes);
    }

    /// The id rule, exactly; and the encoding of valid ids.
    #[test]
    fn ids_follow_the_rule_and_encode_injectively(
        a in prop_oneof![
            "[ -~]{0,140}", "[!-~]{1,130}", "\\PC{0,20}", ".{0,60}", "[é\u{0}-\u{1f}\u{7f}-\u{9f}a/]{1,8}",
            Just(".".to_owned()), Just("..".to_owned()), Just("...".to_owned())
        ],
        b in "[!-~]{1,130}",
    ) {
        let rule = |s: &str| {
            !s.is_empty()
                && s.len() <= MAX_ID_LEN
                // Any Unicode but control characters and / \ ? # %, bounded in bytes.
                && s.chars().all(|c| !c.is_control() && !"/\\?#%".contains(c))
                && s != "."
                && s != ".."
        };
        let parsed = ThreadId::parse(&a);
        prop_assert_eq!(parsed.is_ok(), rule(&a), "{:?}", a);
        for s in [&a, &b] {
            if let Ok(id) = ThreadId::parse(s) {
                let enc = id.encoded();
                prop_assert!(enc.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
                prop_assert!(enc.len() < 250);
                prop_assert_eq!(ThreadId::decode(&enc), Some(id.clone()));
                // One NATS subject token: the log's subject splits back into the id.
                let subject = format!("tg.log.{enc}");
                let token = subject.strip_prefix("tg.log.").unwrap();
                prop_assert!(!token.contains(['.', '*', '>', ' ']));
                prop_assert_eq!(ThreadId::decode(token), Some(id));
            }
        }
        if let (Ok(x), Ok(y)) = (ThreadId::parse(&a), ThreadId::parse(&b)) {
            prop_assert_eq!(x == y, x.encoded() == y.encoded());
        }
    }

    /// Decoding is canonical: a subject token names at most one id, and only its own encoding.
    #[test]
    fn decoding_is_canonical(s in "[A-Za-z0-9_-]{0,60}") {
        if let Some(id) = ThreadId::decode(&s) {
            prop_assert_eq!(id.encoded(), s);
        }
    }

    /// `Last-Event-ID`: digits up to MAX_VERSION (blank: none); anything else is refused.
    #[test]
    fn last_event_id_parsing(s in prop_oneof![
        "[ 0-9]{0,22}", "[0-9+\\-a-z .]{0,8}",
        (0u64..=u64::MAX).prop_map(|v| v.to_string()),
        (MAX_VERSION - 3..=MAX_VERSION.saturating_add(3)).prop_map(|v| v.to_string()),
    ]) {
        let header = axum::http::HeaderValue::from_str(&s).unwrap();
        let got = parse_last_event_id(Some(&header));
        let t = s.trim();
        let want = if t.is_empty() {
            Some(None)
        } else if t.bytes().all(|b| b.is_ascii_digit()) {
            t.parse::<u64>().ok().filter(|v| *v <= MAX_VERSION).map(Some)
        } else {
            None
        };
        prop_assert_eq!(got.ok(), want, "{:?}", s);
    }

    /// `after`: a u64 as Rust reads it, then at most MAX_VERSION; the later of `after` and
    /// `Last-Event-ID` wins.
    #[test]
    fn after_parsing_and_position(
        s in prop_oneof!["[0-9+\\-a-z]{0,22}", (0u64..=u64::MAX).prop_map(|v| v.to_string())],
        last in prop::option::of(0u64..=MAX_VERSION),
    ) {
        let query = format!("after={}", percent(&s));
        let parsed = parse_query::<EventsParams>(&query);
        prop_assert_eq!(parsed.as_ref().ok().and_then(|p| p.after), s.parse::<u64>().ok());
        if let Ok(p) = parsed {
            let got = position(p.after, last).ok();
            let after = p.after.filter(|a| *a <= MAX_VERSION);
            let want = match (p.after, last) {
                (Some(a), _) if a > MAX_VERSION => None,
                _ => Some(after.max(last)),
            };
            prop_assert_eq!(got, want);
        }
    }

    /// `If-Match`: one strong tag holding a canonical version, or `*`; nothing else.
    #[test]
    fn if_match_parsing(values in prop::collection::vec(prop_oneof![
        "[ W/\"*0-9,+]{0,12}",
        (0u64..=u64::MAX).prop_map(|v| format!("\"{v}\"")),
        Just("*".to_owned()),
    ], 0..3)) {
        let mut headers = axum::http::HeaderMap::new();
        for v in &values {
            headers.append("if-match", axum::http::HeaderValue::from_str(v).unwrap());
        }
        let want = match values.as_slice() {
            [] => Some(Expect::Any),
            [one] => {
                let t = one.trim();
                if t == "*" {
                    Some(Expect::Any)
                } else {
                    t.strip_prefix('"').and_then(|t| t.strip_suffix('"')).filter(|d| {
                        !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())
                            && (*d == "0" || !d.starts_with('0'))
                    }).and_then(|d| d.parse::<u64>().ok()).filter(|v| *v <= MAX_VERSION).map(Expect::Exact)
                }
            }
            _ => None,
        };
        prop_assert_eq!(parse_if_match(&headers).ok(), want, "{:?}", values);
    }
}

/// Percent-encodes everything but unreserved characters.
fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The model itself is checked on cases worked out by hand from WIRE.md, so a bug shared by
/// the model and the gateway is not invisible.
#[test]
fn the_model_follows_wire_md() {
    let mut m = Model {
        messages: vec![],
        base: json!({}),
        patches: 0,
        current: json!({"n": 1, "l": [1, 1.0]}),
    };
    let ok = |ops: Value| json!({"messages": [], "patches": [{"patch": {"ops": ops}}]});
    m.apply(&ok(
        json!([{"op": "increment", "path": ["n"], "amount": 0.5}]),
    ))
    .unwrap();
    assert_eq!(m.current["n"], json!(1.5));
    m.apply(&ok(json!([{"op": "remove", "path": ["l"], "value": 1.0}])))
        .unwrap();
    assert_eq!(m.current["l"], json!([1]));
    m.apply(&ok(json!([{"op": "set", "path": ["n", "k"], "value": 2}])))
        .unwrap();
    assert_eq!(
        m.current["n"],
        json!({"k": 2}),
        "a key turns a number into {{}}"
    );
    assert_eq!(
        m.apply(&ok(
            json!([{"op": "set", "path": [], "value": 1}, {"op": "set", "path": [0], "value": 1}])
        )),
        Err((0, 1)),
        "an index never creates"
    );
    assert_eq!(
        m.apply(&ok(
            json!([{"op": "increment", "path": ["missing"], "amount": 1}])
        )),
        Err((0, 0))
    );
    assert_eq!(m.patches, 3);
    let mut with_ids = m.clone();
    with_ids
        .apply(&json!({"messages": [{"id": "a", "content": "1"}, {"id": "a", "content": "2"}, {"content": "3"}], "patches": []}))
        .unwrap();
    assert_eq!(with_ids.messages.len(), 2);
}
