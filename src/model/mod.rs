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
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_thread_id: Option<String>,
    #[serde(default)]
    pub messages: Vec<Message>,
    /// The base state; the current state is this with `patches` applied in order.
    #[serde(default)]
    #[schema(value_type = Value)]
    pub state: Value,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    #[default]
    All,
    Internal,
}

impl Visibility {
    pub fn is_all(&self) -> bool {
        *self == Visibility::All
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub role: Role,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Visibility::is_all")]
    pub visibility: Visibility,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MessageMetadata>,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    #[schema(value_type = Value)]
    pub arguments: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MessageMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_index: Option<u64>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum Reason {
    UserMessage,
    AssistantTurnCommitted,
    ToolResultsCommitted,
    RunFinished,
}

/// One delta (tirea's `ThreadChangeSet`), accepted unchanged on `POST .../deltas`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChangeSet {
    pub run_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_meta: Option<RunMeta>,
    pub reason: Reason,
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub patches: Vec<TrackedPatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<Vec<StateAction>>,
    /// When present and not `null`, replaces the state and clears the thread's patches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Value)]
    pub snapshot: Option<Value>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunOrigin {
    User,
    Subagent,
    AgUi,
    AiSdk,
    A2a,
    Internal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Running,
    Waiting,
    Done,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunMeta {
    pub agent_id: String,
    pub origin: RunOrigin,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_thread_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termination_detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_mailbox_entry_id: Option<String>,
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Extra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionScope {
    Thread,
    Run,
    ToolCall,
}

/// Carried and stored, never interpreted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StateAction {
    pub state_type_name: String,
    pub base_path: String,
    pub scope: ActionScope,
    #[serde(default)]
    pub call_id_override: Option<String>,
    #[schema(value_type = Value)]
    pub payload: Value,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrackedPatch {
    pub patch: Patch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Patch {
    pub ops: Vec<Op>,
}

/// One path segment: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
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
    Set {
        path: Path,
        #[schema(value_type = Value)]
        value: Value,
    },
    Delete {
        path: Path,
    },
    Append {
        path: Path,
        #[schema(value_type = Value)]
        value: Value,
    },
    MergeObject {
        path: Path,
        #[schema(value_type = Value)]
        value: Value,
    },
    Increment {
        path: Path,
        #[schema(value_type = f64)]
        amount: Number,
    },
    Decrement {
        path: Path,
        #[schema(value_type = f64)]
        amount: Number,
    },
    Insert {
        path: Path,
        index: usize,
        #[schema(value_type = Value)]
        value: Value,
    },
    Remove {
        path: Path,
        #[schema(value_type = Value)]
        value: Value,
    },
    LatticeMerge {
        path: Path,
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
