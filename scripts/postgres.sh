#!/usr/bin/env bash
# Install and run a throwaway PostgreSQL cluster on loopback, for the session tests and
# demos of several gateways sharing sessions. Nothing here is meant for production.
#
#   scripts/postgres.sh install          apt-get install postgresql unless initdb/pg_ctl exist
#   scripts/postgres.sh start DIR PORT   new cluster on 127.0.0.1:PORT, trust auth; prints URL
#   scripts/postgres.sh stop DIR         stop the cluster started with DIR and remove its data
#   scripts/postgres.sh url PORT         print the URL of a started cluster
#
# PostgreSQL refuses to run as root: as root, the cluster runs as the 'postgres' user in a
# data folder it owns (under /tmp, because DIR may sit below folders it cannot enter);
# DIR/pgdata records where.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }

# shellcheck source=scripts/apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

bin_dir() {
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return 0
  fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$found" ] && [ -x "$found/pg_ctl" ] && [ -x "$found/initdb" ] || return 1
  echo "$found"
}

cmd_install() {
  bin_dir >/dev/null && return 0
  apt_install PostgreSQL postgresql postgresql
  bin_dir >/dev/null || die "initdb/pg_ctl still missing after apt-get install postgresql"
  # The Debian package may start a system cluster on 5432; the tests never use it.
}

# run_pg CMD...: run a PostgreSQL binary as a non-root user.
run_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

cmd_url() {
  echo "postgresql://postgres@127.0.0.1:$1/postgres"
}

cmd_start() {
  local dir=$1 port=$2 bin data
  bin=$(bin_dir) || die "PostgreSQL binaries not found: run 'scripts/postgres.sh install'"
  mkdir -p "$dir"
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin postgres
    data=$(mktemp -d /tmp/kvfactory-pg.XXXXXX)
    chown postgres: "$data"
  else
    data="$dir/pgdata.d"
    mkdir -p "$data"
  fi
  chmod 700 "$data"
  echo "$data" > "$dir/pgdata"
  run_pg "$bin/initdb" -D "$data/cluster" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
    || die "initdb failed, see $dir/initdb.log"
  run_pg "$bin/pg_ctl" -D "$data/cluster" -l "$data/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$data -c fsync=on -c max_connections=200" \
    start >/dev/null || { cat "$data/server.log" >&2 || true; die "pg_ctl start failed"; }
  cmd_url "$port"
}

cmd_stop() {
  local dir=$1 bin data
  [ -f "$dir/pgdata" ] || return 0
  data=$(cat "$dir/pgdata")
  bin=$(bin_dir) || die "PostgreSQL binaries not found"
  if [ -d "$data/cluster" ]; then
    run_pg "$bin/pg_ctl" -D "$data/cluster" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$data" "$dir/pgdata"
}

case "${1:-}" in
  install) cmd_install ;;
  start) [ $# -eq 3 ] || die "usage: $0 start DIR PORT"; cmd_start "$2" "$3" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; cmd_stop "$2" ;;
  url) [ $# -eq 2 ] || die "usage: $0 url PORT"; cmd_url "$2" ;;
  *) die "usage: $0 install | start DIR PORT | stop DIR | url PORT" ;;
esac
