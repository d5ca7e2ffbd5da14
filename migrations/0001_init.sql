-- threadgate snapshot store schema (see src/store/postgres.rs for the reasoning).
--
-- Applied at start-up by `sqlx::migrate!()`. sqlx 0.8 takes a session-level
-- `pg_advisory_lock` (keyed on the database name) around the whole run by default
-- (`Migrator::locking` is `true` unless `set_locking(false)` is called), and applies each
-- migration in its own transaction together with its `_sqlx_migrations` row, so two gateway
-- processes starting at once apply this file exactly once.
--
-- Conventions:
-- * Every JSON document is stored as serde_json TEXT, never jsonb: jsonb rewrites numbers
--   (1e+16 becomes 10000000000000000) and rejects U+0000; serde_json escapes U+0000, so
--   the text is byte-for-byte what we wrote.
-- * Client-supplied strings kept in their own column (resource_id, parent_thread_id,
--   msg_id, run_id, parent_run_id, idempotency key) are stored JSON-encoded
--   (`"..."` with escapes) because PostgreSQL text rejects U+0000; lookups compare the
--   encoded form, which is injective.
-- * Thread ids are visible ASCII (see src/id.rs) and stored raw with the "C" collation so
--   keyset paging orders exactly like Rust's byte-wise string order.
-- * Every child table cascades from `threads`, so deleting a thread removes everything.

CREATE TABLE threads (
    id               TEXT COLLATE "C" PRIMARY KEY,
    resource_id      TEXT,             -- JSON-encoded string or NULL
    parent_thread_id TEXT,             -- JSON-encoded string or NULL
    version          BIGINT NOT NULL,
    watermark        BIGINT NOT NULL,
    state            TEXT   NOT NULL,  -- base state (JSON)
    current_state    TEXT   NOT NULL,  -- base state with every patch applied (JSON)
    metadata         TEXT   NOT NULL,  -- custom metadata keys (JSON object)
    message_count    BIGINT NOT NULL,  -- also the next message cursor
    patch_count      BIGINT NOT NULL,  -- also the next patch sequence number
    created_at       BIGINT NOT NULL,  -- unix ms
    updated_at       BIGINT NOT NULL   -- unix ms
);

CREATE INDEX threads_resource_id ON threads (resource_id, id);
CREATE INDEX threads_parent_thread_id ON threads (parent_thread_id, id);

CREATE TABLE messages (
    thread_id TEXT COLLATE "C" NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    cursor    BIGINT  NOT NULL,        -- 0-based position in the thread, never reused
    msg_id    TEXT,                    -- JSON-encoded message id or NULL
    run_id    TEXT,                    -- JSON-encoded metadata.run_id or NULL
    internal  BOOLEAN NOT NULL,        -- visibility == internal
    body      TEXT    NOT NULL,        -- the message (JSON)
    PRIMARY KEY (thread_id, cursor),
    -- message ids are unique per thread, not globally; NULLs (no id) never conflict
    UNIQUE (thread_id, msg_id)
);

-- The `run_id` filter of the messages page walks this index instead of the whole thread.
CREATE INDEX messages_run ON messages (thread_id, run_id, cursor) WHERE run_id IS NOT NULL;

CREATE TABLE patches (
    thread_id TEXT COLLATE "C" NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    seq       BIGINT NOT NULL,         -- order of application since the last state reset
    body      TEXT   NOT NULL,         -- the TrackedPatch (JSON)
    PRIMARY KEY (thread_id, seq)
);

CREATE TABLE runs (
    thread_id     TEXT COLLATE "C" NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    run_id        TEXT   NOT NULL,     -- JSON-encoded
    parent_run_id TEXT,                -- JSON-encoded or NULL
    meta          TEXT   NOT NULL,     -- RunMeta (JSON)
    version       BIGINT NOT NULL,     -- thread version of the last delta that updated it
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (thread_id, run_id)
);

CREATE TABLE history (
    thread_id TEXT COLLATE "C" NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    version   BIGINT NOT NULL,
    at        BIGINT NOT NULL,
    change    TEXT   NOT NULL,         -- store::Change (JSON)
    PRIMARY KEY (thread_id, version)
);

CREATE TABLE idempotency (
    thread_id   TEXT COLLATE "C" NOT NULL REFERENCES threads (id) ON DELETE CASCADE,
    key         TEXT   NOT NULL,       -- JSON-encoded client key
    fingerprint TEXT   NOT NULL,
    version     BIGINT NOT NULL,       -- the version the keyed append produced
    PRIMARY KEY (thread_id, key)
);

-- Trimming old keys walks this index.
CREATE INDEX idempotency_version ON idempotency (thread_id, version);
