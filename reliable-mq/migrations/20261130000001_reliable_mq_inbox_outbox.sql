-- reliable-mq: the transactional inbox and outbox (feature `postgres`).
-- Run by `App::migrate()` / `reliable_mq::postgres::migrate(&pool)`; teams that manage their
-- own schema can apply this file as it is. Tables live in the connection's `search_path`.

-- One row per message an inbox consumer handled, written in the handler's transaction.
-- `consumer` is the consumer's queue; rows expire after the consumer's `dedup_ttl`.
CREATE TABLE IF NOT EXISTS reliable_mq_inbox (
    consumer    text        NOT NULL,
    message_id  text        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
CREATE INDEX IF NOT EXISTS reliable_mq_inbox_expires_at ON reliable_mq_inbox (expires_at);

-- Messages to publish, written in the caller's transaction by `Outbox::publish` and
-- published by the relay (status pending -> sent, or failed with the reason).
CREATE TABLE IF NOT EXISTS reliable_mq_outbox (
    id              bigserial   PRIMARY KEY,
    message_id      text        NOT NULL UNIQUE,
    exchange        text        NOT NULL,
    routing_key     text        NOT NULL,
    body            bytea       NOT NULL,
    aggregate_key   text,
    status          text        NOT NULL DEFAULT 'pending'
                                CHECK (status IN ('pending', 'sent', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    failed_reason   text
);
CREATE INDEX IF NOT EXISTS reliable_mq_outbox_pending
    ON reliable_mq_outbox (next_attempt_at, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS reliable_mq_outbox_sent
    ON reliable_mq_outbox (sent_at) WHERE status = 'sent';
CREATE INDEX IF NOT EXISTS reliable_mq_outbox_failed
    ON reliable_mq_outbox (id) WHERE status = 'failed';

-- Wake the relays when a transaction that wrote to the outbox commits (once per statement;
-- the relays also poll, so a missed notification only delays).
CREATE OR REPLACE FUNCTION reliable_mq_outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('reliable_mq_outbox', '');
    RETURN NULL;
END;
$$;
DROP TRIGGER IF EXISTS reliable_mq_outbox_notify ON reliable_mq_outbox;
CREATE TRIGGER reliable_mq_outbox_notify
    AFTER INSERT ON reliable_mq_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION reliable_mq_outbox_notify();
