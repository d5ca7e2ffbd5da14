-- Each life of a thread id gets a random incarnation at create (src/store/mod.rs,
-- `Incarnation`): a thread deleted and created again starts at version 0 once more, and the
-- incarnation keeps JetStream de-duplication ids and live-stream positions of the old life
-- from being taken for the new one. Rows written before this migration keep 0.
ALTER TABLE threads ADD COLUMN incarnation BIGINT NOT NULL DEFAULT 0;
