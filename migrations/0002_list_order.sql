-- Indexes for `GET /v1/threads?order_by=created_at|updated_at` (see `push_list_order` in
-- src/store/postgres.rs): each listing is one range scan on `(key, id)`, forwards for
-- `order=asc` and backwards for `order=desc`, starting at the keyset cursor, and stops after
-- one page, however many threads there are. The sidebar query "this user's threads, most
-- recently active first" (`resource_id=...&order_by=updated_at&order=desc`) uses
-- `threads_resource_updated`.
--
-- Threads filtered by `parent_thread_id` (a parent's sub-agent threads: few) use the existing
-- `(parent_thread_id, id)` index and sort the matches.
--
-- Cost: `updated_at` changes on every write, so each write now also updates two index entries
-- (an update that changes an indexed column cannot be a heap-only update).
--
-- Plain CREATE INDEX (not CONCURRENTLY) because sqlx runs each migration in a transaction; it
-- blocks writes to `threads` while it builds, which is brief at the sizes this store targets.

CREATE INDEX threads_created ON threads (created_at, id);
CREATE INDEX threads_updated ON threads (updated_at, id);
CREATE INDEX threads_resource_created ON threads (resource_id, created_at, id);
CREATE INDEX threads_resource_updated ON threads (resource_id, updated_at, id);
