-- Live events across replicas in direct mode (src/store/postgres/notify.rs): every committed
-- write and every delete is announced with NOTIFY, so each gateway's live streams carry the
-- writes made through every other gateway. An announcement carries the thread and the version
-- only; a gateway following the thread reads the history rows it lacks.
--
-- * Channel: `threadgate_` || md5(<schema of these tables>), so gateways on different schemas
--   of one database (NOTIFY is database-wide) never hear each other, and the name stays within
--   PostgreSQL's 63-byte limit for any schema name.
-- * Payload: `w <version> <thread id>` for a write (a history row inserted), `d <version>
--   <thread id>` for a delete. Thread ids may hold spaces: everything after the second space
--   is the id. Ids are at most 128 bytes, far below NOTIFY's 8000-byte payload limit.
-- * NOTIFY is transactional: it is delivered at commit, only if the transaction commits, and
--   after the writes are visible to other sessions.
-- * Buffered mode (NATS) follows the JetStream log instead and sets `threadgate.notify=off` on
--   its sessions: the WHEN clause then skips the trigger (committing a NOTIFY serialises
--   commits database-wide, a cost for nothing there). Unset means on.
-- * Thread ids are now any Unicode text (src/id.rs); the "C" collation of migration 0001
--   compares their UTF-8 bytes, which is the order Rust's `str` uses.

CREATE FUNCTION threadgate_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('threadgate_' || md5(TG_TABLE_SCHEMA),
                          'w ' || NEW.version || ' ' || NEW.thread_id);
    ELSE
        PERFORM pg_notify('threadgate_' || md5(TG_TABLE_SCHEMA),
                          'd ' || OLD.version || ' ' || OLD.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER history_notify AFTER INSERT ON history FOR EACH ROW
    WHEN (coalesce(current_setting('threadgate.notify', true), '') <> 'off')
    EXECUTE FUNCTION threadgate_notify();

CREATE TRIGGER threads_notify AFTER DELETE ON threads FOR EACH ROW
    WHEN (coalesce(current_setting('threadgate.notify', true), '') <> 'off')
    EXECUTE FUNCTION threadgate_notify();
