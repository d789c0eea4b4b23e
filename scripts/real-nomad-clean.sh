#!/usr/bin/env bash
# Removes what interrupted real-Nomad tests left on the agent at NOMAD_ADDR: every job of the
# namespaces poseidon-test-* (purged) and the namespaces themselves. Tests clean up after
# themselves; this is for runs that were killed.
set -euo pipefail
addr=${NOMAD_ADDR:-http://127.0.0.1:4646}
auth=()
[ -n "${NOMAD_TOKEN:-}" ] && auth=(-H "X-Nomad-Token: $NOMAD_TOKEN")
for ns in $(curl -sf "${auth[@]}" "$addr/v1/namespaces" | python3 -c 'import json,sys; print(" ".join(n["Name"] for n in json.load(sys.stdin) if n["Name"].startswith("poseidon-test-")))'); do
  for job in $(curl -sf "${auth[@]}" "$addr/v1/jobs?namespace=$ns" | python3 -c 'import json,sys; print(" ".join(j["ID"] for j in json.load(sys.stdin)))'); do
    curl -sf "${auth[@]}" -X DELETE "$addr/v1/job/$job?namespace=$ns&purge=true" >/dev/null && echo "purged $ns/$job"
  done
  for _ in $(seq 60); do
    curl -sf "${auth[@]}" -X DELETE "$addr/v1/namespace/$ns" >/dev/null 2>&1 && { echo "deleted namespace $ns"; break; }
    sleep 0.5
  done
done
