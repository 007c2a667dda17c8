#!/usr/bin/env bash
# The embedded default: installs what is missing, starts a local Temporal dev
# server, an opa-backup worker and a sample OPA (examples/demo), backs the
# OPA up into .demo/backups and shows what the backup holds. Every server
# runs on a free loopback port and stops when the script ends; the backups
# stay in .demo/backups.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash scripts/setup.sh
export PATH="$root/.tools/bin:$PATH"

demo="$root/.demo"
mkdir -p "$demo/logs" "$demo/backups"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {
  local what=$1 log=$2; shift 2
  for _ in $(seq 1 300); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "demo: $what did not start; its log, $log, ends with:" >&2
  tail -n 20 "$log" >&2
  exit 1
}

temporal_port=$(free_port)
opa_port=$(free_port)

echo "demo: starting a Temporal dev server on 127.0.0.1:$temporal_port"
temporal server start-dev --ip 127.0.0.1 --port "$temporal_port" --http-port "$(free_port)" \
  --metrics-port "$(free_port)" --headless --log-level error >"$demo/logs/temporal.log" 2>&1 &
pids+=($!)
wait_for "the Temporal dev server" "$demo/logs/temporal.log" \
  temporal operator namespace describe --address "127.0.0.1:$temporal_port" --namespace default

echo "demo: starting a sample OPA on 127.0.0.1:$opa_port with examples/demo"
opa run --server --addr "127.0.0.1:$opa_port" --log-level error examples/demo >"$demo/logs/opa.log" 2>&1 &
pids+=($!)
wait_for "OPA" "$demo/logs/opa.log" curl -sf "http://127.0.0.1:$opa_port/health"

export TEMPORAL_ADDRESS="127.0.0.1:$temporal_port"
echo "demo: starting the opa-backup worker"
node dist/worker/main.js >"$demo/logs/worker.log" 2>&1 &
pids+=($!)
wait_for "the worker" "$demo/logs/worker.log" grep -q '"worker started"' "$demo/logs/worker.log"

# Keys stay across runs, so older demo backups remain readable.
if [[ ! -f "$demo/keys/age-identity.txt" ]]; then
  echo "demo: creating an age identity and a signing key in .demo/keys"
  bin/opa-backup keygen --out "$demo/keys" >/dev/null
fi
recipient=$(cat "$demo/keys/age-recipient.txt")

cat >"$demo/plan.yaml" <<PLAN
# Written by scripts/demo.sh: back up the sample OPA into a local folder,
# encrypted to the demo's age key and with a signed manifest.
name: demo
destination:
  local:
    path: ./backups
encryption:
  recipients: ["$recipient"]
  identity: file:./keys/age-identity.txt
signing:
  key: file:./keys/signing-key.pem
  publicKeyFile: ./keys/signing-key.pub.pem
sources:
  opa:
    - name: sample-opa
      url: http://127.0.0.1:$opa_port
      probes:
        - path: app/authz/allow
          input: { user: bob, action: read, resource: /reports/q3 }
        - path: app/authz/allow
          input: { user: bob, action: delete, resource: /reports/q3 }
        - path: app/authz/reasons
          input: { user: mallory, action: read, resource: /x }
PLAN

echo "demo: bin/opa-backup backup --plan .demo/plan.yaml --wait"
bin/opa-backup backup --plan "$demo/plan.yaml" --wait

echo
bin/opa-backup list --plan "$demo/plan.yaml"
latest=$(ls -d "$demo"/backups/demo/*/ | sort | tail -n 1)
echo
echo "demo: the latest backup is in ${latest%/}:"
(cd "$latest" && find . -type f | sort | sed 's|^\./|  |')
echo
echo "demo: bin/opa-backup verify latest --plan .demo/plan.yaml"
bin/opa-backup verify latest --plan "$demo/plan.yaml"
echo
echo "demo: the OPA bundle holds:"
age --decrypt --identity "$demo/keys/age-identity.txt" "$latest/opa/sample-opa.tar.gz.age" | tar -tzv | sed 's/^/  /'
echo
echo "demo: restore it with:"
echo "  age --decrypt --identity .demo/keys/age-identity.txt --output sample-opa.tar.gz ${latest}opa/sample-opa.tar.gz.age"
echo "  opa run --server --bundle sample-opa.tar.gz"
