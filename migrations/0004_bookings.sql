-- What the bookings worker keeps beside the seed's public.bookings (issue 4).
-- Worker schema only: the dashboard's `drizzle-kit push` owns public.

-- A workflow's own booking id -> bookings.id, per business. The row is the lock
-- two workers take before creating or updating that booking (so they can never
-- create two rows for one external_id), and it remembers the webhook-timestamp
-- of the last push applied, so that an older push that arrives late changes nothing.
-- A booking deleted from the dashboard leaves the row with booking_id NULL: the
-- order guard survives, and the next (newer) push creates the booking again.
CREATE TABLE webhook_worker.n8n_bookings (
    business_id     integer NOT NULL,
    external_id     text NOT NULL,
    booking_id      integer REFERENCES public.bookings (id) ON DELETE SET NULL,
    last_pushed_at  timestamptz,
    last_webhook_id text,
    PRIMARY KEY (business_id, external_id)
);
CREATE INDEX n8n_bookings_booking_id_idx ON webhook_worker.n8n_bookings (booking_id);

-- Bookings whose date falls when the business is closed by its
-- hours_of_operation, as of the last push applied to them. The booking is
-- stored all the same; this is for an operator to query. A later push that
-- moves the booking into opening hours removes its row.
CREATE TABLE webhook_worker.bookings_outside_hours (
    booking_id   integer PRIMARY KEY REFERENCES public.bookings (id) ON DELETE CASCADE,
    business_id  integer NOT NULL,
    -- bookings.date: UTC wall time.
    booking_date timestamp NOT NULL,
    -- The date as pushed, in the local time its offset gives (what was judged).
    local_date   text NOT NULL,
    reason       text NOT NULL,
    webhook_id   text NOT NULL,
    flagged_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bookings_outside_hours_business_idx ON webhook_worker.bookings_outside_hours (business_id, booking_date);
