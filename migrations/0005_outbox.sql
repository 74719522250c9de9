-- Events the ingress accepted while RabbitMQ could not confirm them. The relay
-- publishes them (oldest first) once the broker is back and deletes each row
-- after the broker's confirm. A crash between the two republishes the event,
-- which the worker's inbox turns into a no-op.
CREATE TABLE webhook_worker.outbox (
    id          bigserial PRIMARY KEY,
    event_key   text NOT NULL,
    routing_key text NOT NULL,
    kind        text NOT NULL,
    body        bytea NOT NULL,
    -- The request's W3C trace context, so the trace goes on through the outbox.
    traceparent text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
