#!/usr/bin/env bash
# Acceptance check with Twilio's own SDK: starts `micro8gents run` against a
# fresh database, creates a business with a Twilio integration, posts one whole
# call signed by the official Python SDK, and checks the `calls` row.
# Needs: a built binary (cargo build --release), python3, `pip install twilio`.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN:-target/release/micro8gents}
db="m8_sdk_$$"
port=${PORT:-18181}
admin=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
psql "$admin" -qc "CREATE DATABASE $db"
export DATABASE_URL="${admin%/*}/$db" AMQP_PREFIX="sdk-check" LISTEN_ADDR="127.0.0.1:$port" \
       PUBLIC_BASE_URL="https://hooks.example.com" RUST_LOG=warn
"$bin" run & pid=$!
cleanup() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; psql "$admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"; }
trap cleanup EXIT
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
business=$(psql "$DATABASE_URL" -Atq <<'SQL'
WITH u AS (INSERT INTO users (username, email, password) VALUES ('sdk', 'sdk@example.com', 'x') RETURNING id),
     b AS (INSERT INTO businesses (user_id, business_name, email) SELECT id, 'SDK Dental', 'sdk@example.com' FROM u RETURNING id),
     i AS (INSERT INTO integrations (business_id, type, config, status)
           SELECT id, 'twilio', '{"auth_token": "b3f1c0ffee5eed0123456789abcdef01"}', 'active' FROM b)
SELECT id FROM b;
SQL
)
python3 scripts/twilio_sdk_post.py "http://127.0.0.1:$port" "$PUBLIC_BASE_URL" "$business" b3f1c0ffee5eed0123456789abcdef01
expected="completed|+14155552671|Jane Doe|2025-11-25 12:00:01|2025-11-25 12:02:08|2:05|t|Hi, I'd like to book a cleaning, please."
for _ in $(seq 1 50); do
  row=$(psql "$DATABASE_URL" -Atc "SELECT status, phone, caller, start_time, end_time, duration, recording IS NOT NULL, transcript FROM calls")
  [ "$row" = "$expected" ] && { echo "calls row: $row"; echo "sdk check: ok"; exit 0; }
  sleep 0.2
done
echo "calls row: '$row'"; echo "expected:  '$expected'"; echo "sdk check: FAILED"; exit 1
