#!/usr/bin/env bash
# Makes sure the local Postgres (127.0.0.1:5432, trust auth, database `test`) and
# Redis (127.0.0.1:6379) that the integration tests use are up; starts them if not.
# Installs Debian's chromium (headless report test) when missing and run as root.
set -uo pipefail
pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
if ! pg_up && command -v pg_ctlcluster >/dev/null; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 30); do pg_up && break; sleep 1; done
fi
if ! redis_up && command -v redis-server >/dev/null; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
  for _ in $(seq 30); do redis_up && break; sleep 1; done
fi
# Headless Chromium for the report-page tests (tests/test_report.py, and tests/service/test_web_browser.py
# through the pip package playwright, which drives this binary: no chromedriver, no `playwright install`).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium) >/tmp/poisonaudit-chromium-install.log 2>&1 \
    || echo "chromium: install failed (see /tmp/poisonaudit-chromium-install.log)"
fi
pg_up && echo "postgres: up" || echo "postgres: DOWN"
redis_up && echo "redis: up" || echo "redis: DOWN"
command -v chromium >/dev/null && echo "chromium: $(command -v chromium)" || echo "chromium: MISSING"
