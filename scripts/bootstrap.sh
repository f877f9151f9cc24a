#!/usr/bin/env bash
# Create .venv with Corral and its test tools, and make sure RabbitMQ, Redis and PostgreSQL
# answer (starting them with this machine's own commands when they are installed but down).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"

# The dashboard's browser tests drive Debian's Chromium (tests/gateway/test_dashboard.py).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "warning: chromium not installed: the dashboard's browser tests will skip" >&2
  else
    echo "note: no apt-get: install chromium and chromedriver for the dashboard's browser tests" >&2
  fi
fi

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 120); do up "$1" && return 0; sleep 0.5; done
  echo "error: $2 did not come up on port $1" >&2; return 1
}

if ! up 6379; then
  command -v redis-server >/dev/null || { echo "error: Redis is not installed (apt-get install redis-server)" >&2; exit 1; }
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 Redis
fi
if ! up 5672; then
  command -v rabbitmq-server >/dev/null || { echo "error: RabbitMQ is not installed (apt-get install rabbitmq-server)" >&2; exit 1; }
  echo "starting RabbitMQ"
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ
fi
# Flower's Broker tab and queue lengths need RabbitMQ's management API.
if command -v rabbitmq-plugins >/dev/null && ! up 15672; then
  rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 || true
fi
if ! up 5432 && command -v pg_ctlcluster >/dev/null; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
  wait_port 5432 PostgreSQL || true
fi
