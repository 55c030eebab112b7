#!/usr/bin/env bash
# Start the local PostgreSQL 15 cluster and make sure the Distillery test role/database exist.
# Idempotent: safe to run repeatedly (used by CI and by developers before running tests/test_storage.py).
# Must run as root (uses pg_ctlcluster and `su postgres`).
set -euo pipefail

PG_VERSION="${PG_VERSION:-15}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_ROLE="${PG_ROLE:-distillery}"
PG_PASSWORD="${PG_PASSWORD:-distillery}"
PG_DB="${PG_DB:-distillery_test}"

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" start || true
fi
for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 0.5
done
pg_isready -h 127.0.0.1 -p 5432

role_exists=$(su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='${PG_ROLE}'\"")
if [ "$role_exists" != "1" ]; then
    su postgres -c "psql -v ON_ERROR_STOP=1 -c \"CREATE ROLE ${PG_ROLE} LOGIN PASSWORD '${PG_PASSWORD}' CREATEDB\""
fi

# tests drop their databases WITH (FORCE), which may have to end an autovacuum worker of the superuser
su postgres -c "psql -v ON_ERROR_STOP=1 -qc \"GRANT pg_signal_backend TO ${PG_ROLE}\""

db_exists=$(su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='${PG_DB}'\"")
if [ "$db_exists" != "1" ]; then
    su postgres -c "createdb -O ${PG_ROLE} ${PG_DB}"
fi

echo "PostgreSQL ready: postgresql+psycopg://${PG_ROLE}:${PG_PASSWORD}@127.0.0.1:5432/${PG_DB}"
