-- The Postgres role the worker runs as, next to the dashboard (README, "Deploying
-- next to the dashboard"). Run it once as the dashboard database's owner (or a
-- superuser), connected to that database, after the dashboard created `public`:
--   psql "$DASHBOARD_ADMIN_URL" -v ON_ERROR_STOP=1 -f deploy/postgres/worker-role.sql
-- Replace micro8gents_worker and the password with your own. tests/least_privilege.rs
-- runs this file as it is (with a unique role name) and runs migrate, serve and work
-- under the role.
CREATE ROLE micro8gents_worker LOGIN PASSWORD 'change-me';

-- Read what the dashboard owns.
GRANT USAGE ON SCHEMA public TO micro8gents_worker;
GRANT SELECT ON public.users, public.businesses, public.hours_of_operation, public.faqs, public.integrations
    TO micro8gents_worker;

-- Write calls, bookings and subscriptions (never DELETE: the worker only inserts and updates).
GRANT SELECT, INSERT, UPDATE ON public.calls, public.bookings, public.subscriptions TO micro8gents_worker;
GRANT USAGE ON SEQUENCE public.calls_id_seq, public.bookings_id_seq, public.subscriptions_id_seq
    TO micro8gents_worker;

-- The worker's own tables point at users, calls and bookings (foreign keys that
-- follow the dashboard's deletes); creating such a key needs REFERENCES.
GRANT REFERENCES ON public.users, public.calls, public.bookings TO micro8gents_worker;

-- Everything else of the worker's lives in its own schema, which it owns.
CREATE SCHEMA webhook_worker AUTHORIZATION micro8gents_worker;
