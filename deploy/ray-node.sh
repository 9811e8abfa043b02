#!/usr/bin/env bash
# Start one Ray node of the nptm cluster in the foreground: `ray-node.sh head` or `ray-node.sh worker`.
#
# Token authentication is not optional here: the script refuses to start unless RAY_AUTH_MODE is
# "token" and RAY_AUTH_TOKEN holds a real token. Older Ray releases served the dashboard and the
# job API without any authentication, and clusters exposed that way were taken over to run
# arbitrary code (ShadowRay, CVE-2023-48022).
set -euo pipefail

die() {
    echo "ray-node.sh: $*" >&2
    exit 64
}

role="${1:-}"
[[ "$role" == head || "$role" == worker ]] || die "usage: ray-node.sh head|worker (got '${role}')"

[[ "${RAY_AUTH_MODE:-}" == token ]] \
    || die "RAY_AUTH_MODE must be 'token' (got '${RAY_AUTH_MODE:-<unset>}'); this cluster always authenticates"
token="${RAY_AUTH_TOKEN:-}"
[[ -n "$token" ]] || die "RAY_AUTH_TOKEN is empty; set it in .env (see .env.example)"
[[ "$token" != CHANGEME* ]] \
    || die "RAY_AUTH_TOKEN is still the .env.example placeholder; generate one with: python -c \"import secrets; print(secrets.token_hex(32))\""
(( ${#token} >= 32 )) || die "RAY_AUTH_TOKEN has ${#token} characters; use at least 32 (e.g. secrets.token_hex(32))"

# Fixed ports, so that a firewall between the hosts of a multi-host cluster can allow exactly
# these (deploy/multi-host.md lists them). In one container each node has its own network
# namespace, so every node may use the same numbers.
args=(--block --disable-usage-stats
      --node-manager-port=6380 --object-manager-port=6381 --runtime-env-agent-port=6382
      --dashboard-agent-grpc-port=6383 --metrics-export-port=6384
      --dashboard-agent-listen-port=52365 --min-worker-port=10002 --max-worker-port=10999)
# On the host network (several hosts) a node announces its address on the cluster network.
if [[ -n "${RAY_NODE_IP_ADDRESS:-}" ]]; then
    args+=(--node-ip-address="$RAY_NODE_IP_ADDRESS")
fi
if [[ "$role" == head ]]; then
    # The dashboard (and the job API behind it) listens on every interface *inside* the
    # container so that the published port reaches it; docker-compose.yml publishes it on
    # 127.0.0.1 of the host only. On the host network RAY_DASHBOARD_HOST=127.0.0.1 keeps it
    # there. The head runs no training by default (0 CPUs, 0 GPUs): the GPU workers do, and
    # the head stays responsive.
    args+=(--head --port=6379 --ray-client-server-port=10001
           --dashboard-host="${RAY_DASHBOARD_HOST:-0.0.0.0}" --dashboard-port=8265
           --num-cpus="${RAY_HEAD_NUM_CPUS:-0}" --num-gpus=0)
else
    args+=(--address="${RAY_HEAD_ADDRESS:-ray-head:6379}")
    if [[ -n "${RAY_WORKER_NUM_CPUS:-}" ]]; then
        args+=(--num-cpus="$RAY_WORKER_NUM_CPUS")
    fi
fi

# RAY_ADDRESS in the environment is for nptm and other drivers; `ray start` must not see it.
exec env -u RAY_ADDRESS ray start "${args[@]}"
