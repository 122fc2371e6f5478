#!/usr/bin/env sh
# Create the tokens the compose stack uses: one per service, each with only the scopes it needs.
# Writes docker/.env (read by docker compose) and docker/secrets/prometheus.token; prints yours.
set -eu
cd "$(dirname "$0")"
token() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }
admin=$(token) trainer=$(token) rules=$(token) dashboard=$(token) prometheus=$(token) postgres=$(token)
mkdir -p secrets
printf '%s' "$prometheus" > secrets/prometheus.token
cat > .env <<ENV
RUNSTEER_TOKENS=[{"name":"you","token":"$admin","scopes":["admin"]},{"name":"trainer","token":"$trainer","scopes":["train","read"]},{"name":"rules","token":"$rules","scopes":["read","command"],"kind":"agent"},{"name":"dashboard","token":"$dashboard","scopes":["read","command"]},{"name":"prometheus","token":"$prometheus","scopes":["read"]}]
TRAINER_TOKEN=$trainer
AGENT_TOKEN=$rules
DASHBOARD_TOKEN=$dashboard
POSTGRES_PASSWORD=$postgres
ENV
echo "wrote docker/.env and docker/secrets/; your admin token (for the dashboard and the CLI): $admin"
