#!/bin/sh
# Creates the two RabbitMQ users of README's "Deploying next to the dashboard",
# each with only the permissions it needs, through the management API
# (docker-compose.yml runs it once the broker is up). For the default
# AMQP_PREFIX=micro8gents; with another prefix, change the expressions.
#   ingress (serve):          declare and publish to micro8gents.events; read nothing
#   worker (work, dlq, replay): the whole micro8gents.* topology: declare, consume,
#                              publish to the retry and dead-letter exchanges
set -eu
API="${RABBITMQ_API:-http://rabbitmq:15672/api}"
ADMIN="${RABBITMQ_ADMIN:-admin:admin}"

put() {
  curl -fsS -u "$ADMIN" -X PUT -H 'content-type: application/json' "$API/$1" -d "$2"
}

put "users/micro8gents-ingress" "{\"password\": \"${INGRESS_PASSWORD:?}\", \"tags\": \"\"}"
put "users/micro8gents-worker" "{\"password\": \"${WORKER_PASSWORD:?}\", \"tags\": \"\"}"
put "permissions/%2F/micro8gents-ingress" \
  '{"configure": "^micro8gents\\.events$", "write": "^micro8gents\\.events$", "read": "^$"}'
put "permissions/%2F/micro8gents-worker" \
  '{"configure": "^micro8gents\\.", "write": "^micro8gents\\.", "read": "^micro8gents\\."}'
echo "users micro8gents-ingress and micro8gents-worker are ready"
