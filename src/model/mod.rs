//! The tirea 0.5 wire model (see `docs/wire.md`): threads, messages, change sets and patches.
//!
//! Pure data and pure functions: nothing here does I/O, so every backend and the HTTP edge
//! share one definition of what a thread is and what applying a delta means. Fields that the
//! wire format does not name are kept in `extra` maps so a newer agent's data survives us.

mod apply;
pub mod limits;
mod patch;

pub use apply::{DeltaError, DeltaPlan, apply_delta, normalize_numbers, plan_delta};
pub use patch::{PatchError, PatchErrorKind, apply_op, apply_patch, rebuild_state};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};
use utoipa::ToSchema;

/// A JSON object of custom keys kept as sent.
pub type Extra = Map<String, Value>;

/// A conversation thread in tirea's `Thread` shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Thread {
    /// The thread's id (the URL's `{id}`).
    pub id: String,
    /// Who owns the thread (a user or an organisation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// The thread this one was spawned from (a sub-agent's parent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_thread_id: Option<String>,
    /// The messages, in order; a message's position is its cursor.
    #[serde(default)]
    pub messages: Vec<Message>,
    /// The base state; the current state is this with `patches` applied in order.
    #[serde(default)]
    #[schema(value_type = Value)]
    pub state: Value,
    /// State patches applied to `state` in order to get the current state.
    #[serde(default)]
    pub patches: Vec<TrackedPatch>,
    /// `created_at`, `updated_at`, `version`, `version_timestamp` and custom keys, flat.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: Extra,
}

impl Thread {
    /// An empty thread with the given id.
    pub fn new(id: impl Into<String>) -> Self {
        Thread {
            id: id.into(),
            resource_id: None,
            parent_thread_id: None,
            messages: Vec::new(),
            state: Value::Object(Map::new()),
            patches: Vec::new(),
            metadata: Map::new(),
        }
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A system prompt.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

/// Who may see a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Everyone (the default; omitted on the wire).
    #[default]
    All,
    /// Only the model: left out of message pages unless asked for.
    Internal,
}

impl Visibility {
    /// True for the default, so it can be left out when serialising.
    pub fn is_all(&self) -> bool {
        *self == Visibility::All
    }
}

/// One message of a thread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    /// Unique within the thread; a message whose id the thread has is not appended again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
    /// Tool calls the model made (an empty list is kept as sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call this message answers (role `tool`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// `all` (default) or `internal`.
    #[serde(default, skip_serializing_if = "Visibility::is_all")]
    pub visibility: Visibility,
    /// The run and step that produced it (an empty object is kept as sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MessageMetadata>,
    /// Fields this gateway does not know, kept as sent.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Extra,
}

impl Message {
    /// The run this message was produced in, if its metadata says.
    pub fn run_id(&self) -> Option<&str> {
        self.metadata.as_ref()?.run_id.as_deref()
    }
}

/// A tool call the model made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolCall {
    /// The call's id (a `tool` message's `tool_call_id` refers to it).
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments, any JSON.
    #[schema(value_type = Value)]
    pub arguments: Value,
}

/// Where a message came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MessageMetadata {
    /// The run that produced it (the `run_id` filter of message pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The step within the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_index: Option<u64>,
    /// Fields this gateway does not know, kept as sent.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Extra,
}

/// Why a delta was written (a `RunFinished` delta folds the run in buffered mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Reason {
    /// A user message was added.
    UserMessage,
    /// The model finished a turn.
    AssistantTurnCommitted,
    /// Tool results were added.
    ToolResultsCommitted,
    /// The run ended.
    RunFinished,
}

/// One delta (tirea's `ThreadChangeSet`), accepted unchanged on `POST .../deltas`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChangeSet {
    /// The run that wrote the delta.
    pub run_id: String,
    /// The run that started this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
    /// Creates or updates the run's record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_meta: Option<RunMeta>,
    /// Why the delta was written.
    pub reason: Reason,
    /// Messages to append (de-duplicated by id).
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Patches to append; they must apply to the current state.
    #[serde(default)]
    pub patches: Vec<TrackedPatch>,
    /// State actions, stored and returned, never interpreted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<StateAction>>,
    /// When present and not `null`, replaces the state and clears the thread's patches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Value)]
    pub snapshot: Option<Value>,
    /// Fields this gateway does not know, kept as sent.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Extra,
}

/// Where a run was started from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunOrigin {
    /// A user.
    User,
    /// Another agent.
    Subagent,
    /// An AG-UI frontend.
    AgUi,
    /// The AI SDK.
    AiSdk,
    /// Agent-to-agent.
    A2a,
    /// The runtime itself.
    Internal,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// It is running.
    Running,
    /// It waits for input.
    Waiting,
    /// It ended.
    Done,
}

/// A run's metadata, as its deltas report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunMeta {
    /// The agent that runs.
    pub agent_id: String,
    /// Where the run was started from.
    pub origin: RunOrigin,
    /// Where it stands.
    pub status: RunStatus,
    /// The thread the run belongs to, if not this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_thread_id: Option<String>,
    /// Why it ended (a machine code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_code: Option<String>,
    /// Why it ended (for people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_detail: Option<String>,
    /// The mailbox entry that started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_mailbox_entry_id: Option<String>,
    /// Tokens read by the model so far.
    #[serde(default)]
    pub input_tokens: u64,
    /// Tokens written by the model so far.
    #[serde(default)]
    pub output_tokens: u64,
    /// Fields this gateway does not know, kept as sent.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Extra,
}

/// What a state action applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionScope {
    /// The thread.
    Thread,
    /// The run.
    Run,
    /// One tool call.
    ToolCall,
}

/// Carried and stored, never interpreted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StateAction {
    /// The state type's name.
    pub state_type_name: String,
    /// Where in the state it applies.
    pub base_path: String,
    /// What it applies to.
    pub scope: ActionScope,
    /// A tool call id to use instead of the current one.
    #[serde(default)]
    pub call_id_override: Option<String>,
    /// Its payload, any JSON.
    #[schema(value_type = Value)]
    pub payload: Value,
    /// Fields this gateway does not know, kept as sent.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Extra,
}

/// A patch with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrackedPatch {
    /// The ops.
    pub patch: Patch,
    /// The patch's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// When it was made (unix milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// Who made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What it does (for people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Ops applied in order, all or nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Patch {
    /// The ops.
    pub ops: Vec<Op>,
}

/// One path segment: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// An object key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// A JSON array of segments; `[]` is the root.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path(pub Vec<Seg>);

impl utoipa::PartialSchema for Path {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        let key = ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("an object key"));
        let index = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
            .description(Some("an array index"));
        ArrayBuilder::new()
            .items(OneOfBuilder::new().item(key).item(index))
            .description(Some(
                "Path segments from the state's root: object keys (strings) and array indexes \
                 (non-negative integers); `[]` is the root.",
            ))
            .into()
    }
}

impl ToSchema for Path {}

impl Serialize for Path {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for seg in &self.0 {
            match seg {
                Seg::Key(k) => seq.serialize_element(k)?,
                Seg::Index(i) => seq.serialize_element(i)?,
            }
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Path {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw = Vec::<Value>::deserialize(d)?;
        raw.into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(Seg::Key(s)),
                Value::Number(n) => n
                    .as_u64()
                    .and_then(|i| usize::try_from(i).ok())
                    .map(Seg::Index)
                    .ok_or_else(|| {
                        D::Error::custom(format!(
                            "path segment {n} is not a string key or a non-negative integer index"
                        ))
                    }),
                other => Err(D::Error::custom(format!(
                    "path segment {other} is not a string key or a non-negative integer index"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Path)
    }
}

impl std::fmt::Display for Path {
    /// JSON-pointer-like rendering for error messages: `/a/0/b`, `/` for the root.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for seg in &self.0 {
            match seg {
                Seg::Key(k) => write!(f, "/{k}")?,
                Seg::Index(i) => write!(f, "/{i}")?,
            }
        }
        Ok(())
    }
}

/// A patch operation, tagged by `"op"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Writes `value` at `path`, creating the way.
    Set {
        /// Where.
        path: Path,
        /// What.
        #[schema(value_type = Value)]
        value: Value,
    },
    /// Removes the key or element at `path`; a missing path is a no-op.
    Delete {
        /// Where.
        path: Path,
    },
    /// Pushes `value` onto the array at `path` (a missing or `null` target becomes `[]`).
    Append {
        /// The array.
        path: Path,
        /// What to push.
        #[schema(value_type = Value)]
        value: Value,
    },
    /// Inserts the keys of `value` into the object at `path` (a missing or `null` target becomes `{}`).
    MergeObject {
        /// The object.
        path: Path,
        /// An object whose keys are inserted.
        #[schema(value_type = Value)]
        value: Value,
    },
    /// Adds `amount` to the number at `path`.
    Increment {
        /// The number.
        path: Path,
        /// How much.
        #[schema(value_type = f64)]
        amount: Number,
    },
    /// Subtracts `amount` from the number at `path`.
    Decrement {
        /// The number.
        path: Path,
        /// How much.
        #[schema(value_type = f64)]
        amount: Number,
    },
    /// Inserts `value` at `index` into the array at `path`.
    Insert {
        /// The array.
        path: Path,
        /// Where in the array (at most its length).
        index: usize,
        /// What to insert.
        #[schema(value_type = Value)]
        value: Value,
    },
    /// Removes the first element equal to `value` from the array at `path`.
    Remove {
        /// The array.
        path: Path,
        /// The element to remove (JSON equality: `1` is not `1.0`).
        #[schema(value_type = Value)]
        value: Value,
    },
    /// Exactly `set` (the gateway has no merge registry).
    LatticeMerge {
        /// Where.
        path: Path,
        /// What.
        #[schema(value_type = Value)]
        value: Value,
    },
}

impl Op {
    /// The wire name of the op, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Set { .. } => "set",
            Op::Delete { .. } => "delete",
            Op::Append { .. } => "append",
            Op::MergeObject { .. } => "merge_object",
            Op::Increment { .. } => "increment",
            Op::Decrement { .. } => "decrement",
            Op::Insert { .. } => "insert",
            Op::Remove { .. } => "remove",
            Op::LatticeMerge { .. } => "lattice_merge",
        }
    }

    /// The JSON value the op carries, if any.
    pub fn value(&self) -> Option<&Value> {
        match self {
            Op::Set { value, .. }
            | Op::Append { value, .. }
            | Op::MergeObject { value, .. }
            | Op::Insert { value, .. }
            | Op::Remove { value, .. }
            | Op::LatticeMerge { value, .. } => Some(value),
            Op::Delete { .. } | Op::Increment { .. } | Op::Decrement { .. } => None,
        }
    }

    /// The path the op acts on.
    pub fn path(&self) -> &Path {
        match self {
            Op::Set { path, .. }
            | Op::Delete { path }
            | Op::Append { path, .. }
            | Op::MergeObject { path, .. }
            | Op::Increment { path, .. }
            | Op::Decrement { path, .. }
            | Op::Insert { path, .. }
            | Op::Remove { path, .. }
            | Op::LatticeMerge { path, .. } => path,
        }
    }
}
