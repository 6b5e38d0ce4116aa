#!/usr/bin/env bash
# Make sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) answer, for the test suite:
# start them when they are installed but stopped, install them with apt when absent, wait until
# they answer (bounded), then create the test database if it does not exist; install strace
# (the fault-injection tests use it) when absent.
# Exports nothing. Meant for dev and CI machines (run as root, or with sudo available).
# Overrides (for testing this script): SERVICES_PG_PORT, SERVICES_PG_CLUSTER, SERVICES_REDIS_PORT,
# SERVICES_WAIT_S, DISTILLERY_TEST_DB_NAME.
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT="${SERVICES_PG_PORT:-5432}"
PG_CLUSTER="${SERVICES_PG_CLUSTER:-main}"
PG_USER=postgres
REDIS_HOST=127.0.0.1
REDIS_PORT="${SERVICES_REDIS_PORT:-6379}"
TEST_DB="${DISTILLERY_TEST_DB_NAME:-distillery_test}"
WAIT_S="${SERVICES_WAIT_S:-60}"

log() { printf 'services: %s\n' "$*"; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

if [[ "$(id -u)" -eq 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  SUDO=()
fi

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    log "apt-get update"
    "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

tcp_open() { # host port
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" >/dev/null 2>&1
}

pg_up() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h "$PG_HOST" -p "$PG_PORT" -t 2
  else
    tcp_open "$PG_HOST" "$PG_PORT"
  fi
}

redis_up() {
  if command -v redis-cli >/dev/null 2>&1; then
    [[ "$(timeout 3 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
  else
    timeout 3 bash -c '
      exec 3<>/dev/tcp/$0/$1 || exit 1
      printf "PING\r\n" >&3
      IFS= read -r line <&3
      [[ "$line" == +PONG* ]]' "$REDIS_HOST" "$REDIS_PORT" >/dev/null 2>&1
  fi
}

wait_for() { # name check-function
  local name="$1" check="$2" start=$SECONDS
  while ((SECONDS - start < WAIT_S)); do
    if "$check"; then
      log "$name answers (after $((SECONDS - start))s)"
      return 0
    fi
    sleep 1
  done
  die "$name did not answer within ${WAIT_S}s"
}

# ---------------------------------------------------------------- PostgreSQL
pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1; }

start_postgres() {
  command -v pg_ctlcluster >/dev/null 2>&1 || apt_install postgresql
  if pg_up; then return 0; fi # the package install may have started it
  local v
  v="$(pg_version)"
  [[ -n "$v" ]] || v="$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)"
  [[ -n "$v" ]] || die "PostgreSQL server binaries not found"
  if [[ ! -d "/etc/postgresql/$v/$PG_CLUSTER" ]]; then
    log "creating cluster $v/$PG_CLUSTER on port $PG_PORT"
    "${SUDO[@]}" pg_createcluster --port "$PG_PORT" "$v" "$PG_CLUSTER" >/dev/null
  fi
  log "starting PostgreSQL cluster $v/$PG_CLUSTER"
  "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$v" "$PG_CLUSTER" start ||
    log "pg_ctlcluster returned $? (it may already be starting); waiting"
}

# Tests connect as postgres over TCP without a password. A fresh Debian cluster asks for one
# on 127.0.0.1, so when that fails allow trust for the postgres role on loopback only.
ensure_pg_auth() {
  command -v psql >/dev/null 2>&1 || apt_install postgresql-client
  if PGCONNECT_TIMEOUT=5 psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -w -tAc 'SELECT 1' \
    >/dev/null 2>&1; then
    return 0
  fi
  local v hba
  v="$(pg_version)"
  hba="/etc/postgresql/$v/$PG_CLUSTER/pg_hba.conf"
  [[ -n "$v" && -f "$hba" ]] ||
    die "cannot connect as $PG_USER to $PG_HOST:$PG_PORT without a password, and no local pg_hba.conf to fix"
  log "allowing trust auth for $PG_USER on loopback in $hba"
  "${SUDO[@]}" sed -i "1i host all $PG_USER 127.0.0.1/32 trust\nhost all $PG_USER ::1/128 trust" "$hba"
  "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$v" "$PG_CLUSTER" reload
  sleep 1
  PGCONNECT_TIMEOUT=5 psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -w -tAc 'SELECT 1' \
    >/dev/null || die "still cannot connect as $PG_USER to $PG_HOST:$PG_PORT"
}

if pg_up; then
  log "PostgreSQL already answers on $PG_HOST:$PG_PORT"
else
  start_postgres
  wait_for PostgreSQL pg_up
fi
ensure_pg_auth

# --------------------------------------------------------------------- Redis
start_redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  if redis_up; then return 0; fi # the package install may have started it
  command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools
  log "starting redis-server on $REDIS_HOST:$REDIS_PORT"
  "${SUDO[@]}" mkdir -p /var/lib/redis /var/log/redis
  "${SUDO[@]}" redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
}

if redis_up; then
  log "Redis already answers on $REDIS_HOST:$REDIS_PORT"
else
  start_redis
  wait_for Redis redis_up
fi

# ------------------------------------------------------------- test database
PSQL=(psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres -w -v ON_ERROR_STOP=1)
if [[ "$("${PSQL[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname='$TEST_DB'")" == "1" ]]; then
  log "database $TEST_DB exists"
else
  "${PSQL[@]}" -qc "CREATE DATABASE \"$TEST_DB\""
  log "created database $TEST_DB"
fi

# ------------------------------------------------------------------ strace
# The fault-injection tests kill a real process at one exact system call with strace
# (tests/unit/test_publish_kill.py, tests/e2e/test_durable.py).
if command -v strace >/dev/null 2>&1; then
  log "strace found"
else
  apt_install strace
fi
