#!/usr/bin/env bash
# Two kvfactory servers (ports 8000 and 8001) sharing one Redis on 127.0.0.1:6390 as the
# remote tier: a context prefilled on one is served from Redis by the other. Each server
# keeps its own memory and disk tiers under .shared-demo/; both use the same server
# secret so that a tenant's keys are the same on both. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=.shared-demo
port_a=${PORT_A:-8000}
port_b=${PORT_B:-8001}
redis_port=${REDIS_PORT:-6390}
mkdir -p "$demo"
bash scripts/redis.sh install
bash scripts/redis.sh start "$redis_port" "$demo/redis"
remote=$(bash scripts/redis.sh url "$redis_port")
secret_file="$demo/server-secret"
[ -s "$secret_file" ] || .venv/bin/python -c 'import secrets; print(secrets.token_hex(32))' >"$secret_file"
export KVFACTORY_SERVER_SECRET
KVFACTORY_SERVER_SECRET=$(cat "$secret_file")

pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  bash scripts/redis.sh stop "$demo/redis" || true
}
trap cleanup EXIT INT TERM

# One after the other: the first start converts the model once for both.
for port in "$port_a" "$port_b"; do
  .venv/bin/kvfactory serve --host 127.0.0.1 --port "$port" \
    --store-dir "$demo/store-$port" --store-remote "$remote" &
  pids+=($!)
  until curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "server on port $port failed to start" >&2; exit 1; }
    sleep 1
  done
done
echo "servers: http://127.0.0.1:$port_a/v1 and http://127.0.0.1:$port_b/v1, shared tier $remote"
wait -n "${pids[@]}"
