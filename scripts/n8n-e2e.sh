#!/usr/bin/env bash
# End to end with a real n8n: imports and activates the two workflows in
# deploy/n8n/, starts n8n and `micro8gents run`, has n8n push a signed booking
# (outside opening hours) to the service, and checks that
#   - the booking row is written and flagged,
#   - the booking.outside_hours notice it causes reaches n8n, whose receiving
#     workflow verifies the signature and ends in its "Accept (204)" branch,
#   - a notice with a wrong signature ends in n8n's "Reject (401)" branch.
#
# Installs n8n (npm, ~4 minutes and ~1 GB the first time) into
# ${N8N_HOME:-~/.cache/micro8gents-n8n} if it is missing. Needs node >= 18, npm,
# psql, curl, python3, the local Postgres and RabbitMQ. Uses its own databases
# (dropped at the end), the AMQP prefix `n8n-e2e`, and free local ports.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
log() { printf '[n8n-e2e %3ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
fail() { log "FAILED: $*"; exit 1; }

N8N_VERSION=1.82.3
N8N_HOME=${N8N_HOME:-$HOME/.cache/micro8gents-n8n}
admin=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
bin=${BIN:-target/debug/micro8gents}
prefix=n8n-e2e
# The key n8n's Crypto nodes are given; the service stores whsec_ + base64(key).
key=${N8N_SIGNING_KEY:-n8n-e2e-signing-key-$(date +%s)}
secret="whsec_$(printf '%s' "$key" | base64 -w0)"

# --- n8n, installed once -------------------------------------------------------
if [ ! -x "$N8N_HOME/node_modules/.bin/n8n" ] || ! grep -q "\"version\": \"$N8N_VERSION\"" "$N8N_HOME/node_modules/n8n/package.json" 2>/dev/null; then
  log "installing n8n $N8N_VERSION into $N8N_HOME (first run only)"
  mkdir -p "$N8N_HOME"
  cat > "$N8N_HOME/package.json" <<JSON
{ "name": "micro8gents-n8n", "private": true,
  "dependencies": { "n8n": "$N8N_VERSION" },
  "overrides": { "xlsx": "0.18.5" } }
JSON
  (cd "$N8N_HOME" && npm install --ignore-scripts --no-audit --no-fund --loglevel=error)
  log "n8n installed"
fi
n8n="$N8N_HOME/node_modules/.bin/n8n"

if [ -z "${BIN:-}" ]; then
  log "building micro8gents"
  cargo build --quiet --bin micro8gents
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
n8n_port=$(free_port)
m8db="m8_n8n_e2e_$$"
n8ndb="n8n_e2e_$$"
tmp=$(mktemp -d)
pids=()

delete_queues() {
  { rabbitmqctl -q list_queues name 2>/dev/null || true; } | { grep "^$prefix\." || true; } | while read -r q; do
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true
  done
}
cleanup() {
  if [ -n "${KEEP:-}" ]; then log "KEEP set: leaving $m8db, $n8ndb, $tmp and the processes ${pids[*]}"; return; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  psql "$admin" -qc "DROP DATABASE IF EXISTS $m8db WITH (FORCE)" >/dev/null 2>&1 || true
  psql "$admin" -qc "DROP DATABASE IF EXISTS $n8ndb WITH (FORCE)" >/dev/null 2>&1 || true
  delete_queues
  rm -rf "$tmp"
}
trap cleanup EXIT
delete_queues
psql "$admin" -qc "CREATE DATABASE $m8db"
psql "$admin" -qc "CREATE DATABASE $n8ndb"
m8url="${admin%/*}/$m8db"
n8nurl="${admin%/*}/$n8ndb"

# --- micro8gents ---------------------------------------------------------------
log "starting micro8gents run on 127.0.0.1:$port"
DATABASE_URL="$m8url" AMQP_PREFIX="$prefix" LISTEN_ADDR="127.0.0.1:$port" \
  PUBLIC_BASE_URL="http://127.0.0.1:$port" NOTIFY_ALLOW_PRIVATE_NETWORKS=true \
  NOTIFY_RETRY_DELAYS=1s,2s,5s RETRY_DELAYS=1s,2s RUST_LOG=${RUST_LOG:-warn} \
  "$bin" run > "$tmp/micro8gents.log" 2>&1 & pids+=($!)
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
curl -fs "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$tmp/micro8gents.log"; fail "micro8gents is not ready"; }

notify_url="http://127.0.0.1:$n8n_port/webhook/micro8gents-notices"
business=$(psql "$m8url" -Atq -v secret="$secret" -v notify="$notify_url" <<'SQL'
WITH u AS (INSERT INTO users (username, email, password) VALUES ('n8n-e2e', 'n8n-e2e@example.com', 'x') RETURNING id),
     b AS (INSERT INTO businesses (user_id, business_name, email)
           SELECT id, 'E2E Dental', 'desk@example.com' FROM u RETURNING id),
     h AS (INSERT INTO hours_of_operation (business_id, day_of_week, open_time, close_time, is_open)
           SELECT b.id, d, '09:00', '17:00', true FROM b,
                  unnest(ARRAY['Monday','Tuesday','Wednesday','Thursday','Friday']) d),
     i AS (INSERT INTO integrations (business_id, type, config, status)
           SELECT id, 'n8n', jsonb_build_object('webhook_secret', :'secret', 'notify_url', :'notify'), 'active' FROM b)
SELECT id FROM b;
SQL
)
log "business $business: n8n integration with notify_url $notify_url"

# --- n8n -----------------------------------------------------------------------
export N8N_USER_FOLDER="$tmp/n8n" DB_TYPE=postgresdb DB_POSTGRESDB_HOST=127.0.0.1 DB_POSTGRESDB_PORT=5432 \
  DB_POSTGRESDB_DATABASE="$n8ndb" DB_POSTGRESDB_USER=postgres DB_POSTGRESDB_PASSWORD="" \
  N8N_PORT="$n8n_port" N8N_LISTEN_ADDRESS=127.0.0.1 N8N_ENCRYPTION_KEY=n8n-e2e-encryption-key \
  N8N_DIAGNOSTICS_ENABLED=false N8N_VERSION_NOTIFICATIONS_ENABLED=false N8N_PERSONALIZATION_ENABLED=false \
  N8N_SECURE_COOKIE=false N8N_RUNNERS_ENABLED=false EXECUTIONS_DATA_SAVE_ON_SUCCESS=all \
  EXECUTIONS_DATA_SAVE_ON_ERROR=all N8N_LOG_LEVEL=warn N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS=false
mkdir -p "$N8N_USER_FOLDER"
for wf in receive-notices push-booking; do
  # The files are single workflows (what the editor's "Import from File" takes);
  # the CLI takes a list.
  { echo '['; sed -e "s|REPLACE_WITH_YOUR_SIGNING_KEY|$key|g" \
      -e "s|REPLACE_WITH_BOOKINGS_URL|http://127.0.0.1:$port/webhooks/n8n/$business/bookings|g" \
      "deploy/n8n/$wf.json"; echo ']'; } > "$tmp/$wf.json"
  log "importing deploy/n8n/$wf.json"
  "$n8n" import:workflow --input="$tmp/$wf.json" > "$tmp/import-$wf.log" 2>&1 || { cat "$tmp/import-$wf.log"; fail "import $wf"; }
done
for id in m8NoticeReceiver m8PushBookingWf1; do
  "$n8n" update:workflow --id="$id" --active=true > "$tmp/activate-$id.log" 2>&1 || { cat "$tmp/activate-$id.log"; fail "activate $id"; }
done
log "starting n8n on 127.0.0.1:$n8n_port"
"$n8n" start > "$tmp/n8n.log" 2>&1 & pids+=($!)

# --- n8n pushes a signed booking -----------------------------------------------
booking='{"external_id":"e2e-1","customer":"Jane Doe","phone":"+14155552671","email":"jane@example.com","service":"Cleaning","date":"2026-03-14T10:00:00+00:00","notes":"Saturday: outside opening hours"}'
answer=""
for _ in $(seq 1 120); do
  answer=$(curl -s -m 10 -X POST -H 'content-type: application/json' -d "$booking" \
           "http://127.0.0.1:$n8n_port/webhook/micro8gents-push-booking" || true)
  case "$answer" in *accepted*) break ;; esac
  sleep 1
done
case "$answer" in *accepted*) ;; *) tail -n 30 "$tmp/n8n.log"; fail "n8n's push was not accepted: $answer" ;; esac
log "n8n pushed the booking; the service answered: $answer"

row=""
for _ in $(seq 1 100); do
  row=$(psql "$m8url" -Atc "SELECT b.customer, b.service, b.date, b.status, o.reason FROM bookings b
                             JOIN webhook_worker.bookings_outside_hours o ON o.booking_id = b.id")
  [ -n "$row" ] && break; sleep 0.2
done
[ -n "$row" ] || fail "no flagged booking row"
log "bookings row: $row"

notice=""
for _ in $(seq 1 150); do
  notice=$(psql "$m8url" -Atc "SELECT kind, outcome, tries FROM webhook_worker.notices WHERE settled_at IS NOT NULL")
  [ -n "$notice" ] && break; sleep 0.2
done
[ "$notice" = "booking.outside_hours|delivered|1" ] || { tail -n 30 "$tmp/micro8gents.log"; fail "notice: '$notice'"; }
log "notice: $notice"

# n8n's executions of the receiving workflow, with the nodes that ran.
executions() {
  psql "$n8nurl" -Atc "SELECT e.id, e.status,
           CASE WHEN d.data LIKE '%\"Accept (204)\"%' THEN 'Accept (204)' ELSE '' END ||
           CASE WHEN d.data LIKE '%\"Reject (401)\"%' THEN 'Reject (401)' ELSE '' END
      FROM execution_entity e JOIN execution_data d ON d.\"executionId\" = e.id
     WHERE e.\"workflowId\" = 'm8NoticeReceiver' AND e.finished ORDER BY e.id"
}
runs=""
for _ in $(seq 1 50); do runs=$(executions); [ -n "$runs" ] && break; sleep 0.2; done
log "n8n executions of the receiving workflow: $(echo "$runs" | tr '\n' ' ')"
[ "$(echo "$runs" | grep -c 'success|Accept (204)$')" = 1 ] || fail "the notice did not end in n8n's Accept (204) branch"

# --- a notice with a wrong signature -------------------------------------------
ts=$(date +%s)
body='{"type":"call.ended","timestamp":"2026-03-14T10:00:00Z","data":{"business_id":1}}'
status=$(curl -s -o "$tmp/401.json" -w '%{http_code}' -X POST -H 'content-type: application/json' \
  -H 'webhook-id: msg_forged' -H "webhook-timestamp: $ts" -H 'webhook-signature: v1,bm90IHRoZSBzaWduYXR1cmU=' \
  -d "$body" "$notify_url")
log "a forged notice: n8n answered $status $(cat "$tmp/401.json")"
[ "$status" = 401 ] || fail "expected 401 for a wrong signature"
for _ in $(seq 1 50); do runs=$(executions); echo "$runs" | grep -q 'Reject (401)$' && break; sleep 0.2; done
echo "$runs" | grep -q 'Reject (401)$' || fail "no execution ended in the Reject (401) branch"
log "n8n executions of the receiving workflow: $(echo "$runs" | tr '\n' ' ')"
log "n8n e2e: ok"
