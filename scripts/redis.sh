#!/usr/bin/env bash
# Install and run throwaway redis-server processes on loopback, for tests, benchmarks and
# the two-servers-one-Redis demo. Nothing here is meant for production Redis.
#
#   scripts/redis.sh install               apt-get install redis-server unless it is on PATH
#   scripts/redis.sh start PORT DIR [--persist]
#                                          daemonized server on 127.0.0.1:PORT, files in DIR
#   scripts/redis.sh stop DIR              stop every server started with DIR (incl. cluster)
#   scripts/redis.sh cluster BASEPORT DIR  three masters on BASEPORT..BASEPORT+2, one cluster
#   scripts/redis.sh url PORT              print the redis:// URL of a started server
set -euo pipefail

die() { echo "redis.sh: $*" >&2; exit 1; }

# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

cmd_install() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return 0
  fi
  apt_install redis-server "redis-server (>= 6)" redis-server
  command -v redis-server >/dev/null 2>&1 || die "redis-server still not on PATH after apt-get install"
  # The Debian package may start a system service on 6379; tests never use it.
}

wait_ready() {
  local port=$1
  for _ in $(seq 1 100); do
    if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
      return 0
    fi
    sleep 0.05
  done
  die "redis-server on port $port did not answer PING within 5 s"
}

# start_node PORT DIR PERSIST EXTRA... : one daemonized server; its files live in DIR/PORT.
start_node() {
  local port=$1 dir=$2 persist=$3
  shift 3
  local node_dir="$dir/$port"
  mkdir -p "$node_dir"
  node_dir=$(cd "$node_dir" && pwd)
  local save_args=(--save "" --appendonly no)
  if [ "$persist" = "yes" ]; then
    save_args=(--save "60 1" --appendonly yes --appendfsync everysec)
  fi
  redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes \
    --daemonize yes --pidfile "$node_dir/redis.pid" --logfile "$node_dir/redis.log" \
    --dir "$node_dir" "${save_args[@]}" "$@"
  wait_ready "$port"
}

cmd_start() {
  [ $# -ge 2 ] || die "usage: redis.sh start PORT DIR [--persist]"
  local port=$1 dir=$2 persist=no
  [ "${3:-}" = "--persist" ] && persist=yes
  start_node "$port" "$dir" "$persist"
  echo "redis://127.0.0.1:$port/0"
}

alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "${state:0:1}" != "Z" ]
}

cmd_stop() {
  [ $# -ge 1 ] || die "usage: redis.sh stop DIR"
  local dir=$1 pidfile pid
  [ -d "$dir" ] || return 0
  for pidfile in "$dir"/*/redis.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      # A daemonized server is not our child: where nothing reaps it, it lingers as a
      # zombie that `kill -0` still sees, so wait for it to be gone or defunct.
      for _ in $(seq 1 100); do
        alive "$pid" || break
        sleep 0.05
      done
      if alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
  done
}

cmd_cluster() {
  [ $# -ge 2 ] || die "usage: redis.sh cluster BASEPORT DIR"
  local base=$1 dir=$2 port nodes=()
  for offset in 0 1 2; do
    port=$((base + offset))
    start_node "$port" "$dir" no --cluster-enabled yes \
      --cluster-config-file "nodes-$port.conf" --cluster-node-timeout 2000
    nodes+=("127.0.0.1:$port")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$dir/cluster-create.log" 2>&1 \
    || { cat "$dir/cluster-create.log" >&2; die "redis-cli --cluster create failed"; }
  # Every node must agree the cluster is ok: a node that has not yet heard of all slots
  # answers CLUSTERDOWN for a moment after creation.
  local ok
  for _ in $(seq 1 100); do
    ok=0
    for offset in 0 1 2; do
      redis-cli -h 127.0.0.1 -p $((base + offset)) cluster info 2>/dev/null \
        | grep -q "cluster_state:ok" && ok=$((ok + 1))
    done
    if [ "$ok" -eq 3 ]; then
      echo "redis+cluster://127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2))"
      return 0
    fi
    sleep 0.1
  done
  die "cluster on $base..$((base + 2)) did not reach cluster_state:ok within 10 s"
}

main() {
  local cmd=${1:-}
  [ -n "$cmd" ] || die "usage: redis.sh install|start|stop|cluster|url ..."
  shift
  case "$cmd" in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    cluster) cmd_cluster "$@" ;;
    url) echo "redis://127.0.0.1:${1:?port}/0" ;;
    *) die "unknown command '$cmd' (install|start|stop|cluster|url)" ;;
  esac
}

main "$@"
