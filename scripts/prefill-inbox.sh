#!/usr/bin/env bash
# Pre-fills a database's inbox with what DAYS days at PER_DAY events a day
# leave behind, to measure that the cost per event does not creep (issue 16).
#
#   scripts/prefill-inbox.sh postgres://postgres@127.0.0.1:5434/template1 new 30 60000
#   scripts/prefill-inbox.sh ... old 180 60000      # the inbox before migration 0006
#
# "new": DAYS days of keys (webhook_worker.inbox_keys) and of the event log
# (one partition per day, envelopes of the compressed size, ~145 bytes).
# "old": the old single table, text keys, JSON envelopes of ~500 bytes; run it
# on a database migrated to 0005 (the code before migration 0006).
# Filling `template1` of a Postgres of your own makes every database the
# benchmark creates start from it. Never run it against a shared server.
set -euo pipefail
url=${1:?database url}; scheme=${2:?new or old}; days=${3:-30}; per_day=${4:-60000}
psql=(psql -v ON_ERROR_STOP=1 -q "$url")
case $scheme in
new)
  for ((d = days; d >= 1; d--)); do
    "${psql[@]}" <<SQL
BEGIN;
SELECT webhook_worker.create_inbox_partitions((now() AT TIME ZONE 'UTC')::date - $d, (now() AT TIME ZONE 'UTC')::date - $d);
INSERT INTO webhook_worker.inbox_keys (key_hash)
SELECT webhook_worker.event_key_hash('prefill:$d:' || i) FROM generate_series(1, $per_day) i;
INSERT INTO webhook_worker.inbox (key_hash, day, kind, business_id, applied_at, outcome, envelope)
SELECT webhook_worker.event_key_hash('prefill:$d:' || i), (now() AT TIME ZONE 'UTC')::date - $d,
       'twilio_call_status', 1 + i % 20, t, 'applied',
       '\x01'::bytea || decode(repeat(md5(i::text || ':' || '$d'), 5), 'hex') || sha256(convert_to(i::text, 'UTF8')) || sha256(convert_to('$d' || i, 'UTF8'))
  FROM generate_series(1, $per_day) i,
       LATERAL (SELECT ((now() AT TIME ZONE 'UTC')::date - $d)::timestamp AT TIME ZONE 'UTC' + i * interval '1.44 s' AS t) x;
COMMIT;
SQL
  done
  ;;
old)
  # Rows first, then the indexes, built by sorting (much faster than 10 M random inserts).
  "${psql[@]}" -c "ALTER TABLE webhook_worker.inbox DROP CONSTRAINT inbox_pkey" \
               -c "DROP INDEX webhook_worker.inbox_provider_received_idx"
  for ((d = days; d >= 1; d--)); do
    "${psql[@]}" <<SQL
INSERT INTO webhook_worker.inbox (event_key, provider, kind, business_id, received_at, applied_at, outcome, envelope)
SELECT k, 'twilio', 'twilio_call_status', b, t, t, 'applied',
       json_build_object('version', 1, 'key', k, 'business_id', b, 'received_at', t, 'request_id', md5(k),
         'event', json_build_object('kind', 'twilio_call_status', 'data', json_build_object(
           'call_sid', 'CA' || md5(i::text || ':' || '$d'), 'parent_call_sid', null, 'status', 'completed', 'sequence', 3,
           'timestamp', t, 'direction', 'inbound', 'from', '+14155550123', 'to', '+15005550006',
           'caller_name', null, 'call_duration', 125)))
  FROM generate_series(1, $per_day) i,
       LATERAL (SELECT 'twilio:status:' || (1 + i % 20) || ':CA' || md5(i::text || ':' || '$d') || ':3:completed' AS k,
                       1 + i % 20 AS b,
                       ((now() AT TIME ZONE 'UTC')::date - $d)::timestamp AT TIME ZONE 'UTC' + i * interval '1.44 s' AS t) x;
SQL
  done
  "${psql[@]}" -c "ALTER TABLE webhook_worker.inbox ADD PRIMARY KEY (event_key)" \
               -c "CREATE INDEX inbox_provider_received_idx ON webhook_worker.inbox (provider, received_at)"
  ;;
*) echo "scheme must be new or old" >&2; exit 2 ;;
esac
"${psql[@]}" -c "VACUUM ANALYZE" -c "SELECT relname, pg_size_pretty(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE nspname = 'webhook_worker' AND relkind IN ('r', 'p') AND NOT relispartition ORDER BY 1"
