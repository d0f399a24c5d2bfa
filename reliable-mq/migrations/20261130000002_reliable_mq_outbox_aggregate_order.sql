-- reliable-mq: per-aggregate order in the outbox relay (`OutboxRelay::ordered_per_aggregate`).
-- The relay asks, for each pending row with an aggregate key, whether an earlier row of the
-- same key is still pending: this index answers that from the pending rows alone.
CREATE INDEX IF NOT EXISTS reliable_mq_outbox_pending_aggregate
    ON reliable_mq_outbox (aggregate_key, id)
    WHERE status = 'pending' AND aggregate_key IS NOT NULL;
