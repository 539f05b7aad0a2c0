#!/usr/bin/env bash
# splitserve's container entrypoint (installed as /usr/local/bin/splitserve-entrypoint).
#
#   splitserve-entrypoint serve [FLAG...]   start this pod's Ray node from the command KubeRay
#                                           generated, without --block; wait until the node answers;
#                                           then exec `splitserve serve FLAG...`, so splitserve is the
#                                           container's main process and SIGTERM reaches it (it drains)
#   splitserve-entrypoint node              run this pod's Ray node in the foreground (the generated
#                                           `ray start ... --block`): prefill and decode pods, whose
#                                           workers the head's serve places there as Ray actors
#   splitserve-entrypoint COMMAND [ARG...]  run anything else (`splitserve generate ...`, bash)
#
# KubeRay hands its generated start command over in $KUBERAY_GEN_RAY_START_CMD; the chart sets the
# RayCluster annotation ray.io/overwrite-container-cmd=true so that KubeRay keeps this container's
# own command instead of running `ray start --block` itself. Without that variable (docker run),
# `serve` starts a Ray of its own, as on a laptop.
#
# Environment: SPLITSERVE_NODE_WAIT_S (default 180): seconds to wait for the Ray node to answer;
# SPLITSERVE_RAYLET_HEALTH_URL: the node's raylet health check (the dashboard agent's, whose
# default port is 52365; the chart's probes use the same one).
set -euo pipefail

readonly NODE_WAIT_S="${SPLITSERVE_NODE_WAIT_S:-180}"
readonly RAYLET_HEALTH_URL="${SPLITSERVE_RAYLET_HEALTH_URL:-http://127.0.0.1:52365/api/local_raylet_healthz}"

log() {
    printf 'splitserve-entrypoint: %s\n' "$*" >&2
}

usage() {
    log "usage: splitserve-entrypoint serve [FLAG...] | node | COMMAND [ARG...]"
}

# Ray opens many sockets and files; KubeRay raises the limit the same way before `ray start`.
# Without CAP_SYS_RESOURCE the soft limit can still rise to the hard one.
raise_open_files() {
    local hard
    hard="$(ulimit -Hn)"
    ulimit -n 65536 2>/dev/null || ulimit -n "${hard}" || log "could not raise the open-files limit"
}

# The generated command with --block removed, so that `ray start` returns once the node's
# processes run (KubeRay writes flags as " --name=value " or " --name ").
start_command_without_block() {
    local command=" $1 "
    command="${command// --block / }"
    command="${command// --block=true / }"
    printf '%s' "${command}"
}

# Until the raylet of this pod answers its health check (it asks the GCS whether the raylet is
# alive, so a success also means the node joined the cluster).
wait_for_node() {
    local deadline=$((SECONDS + NODE_WAIT_S))
    until python3 - "${RAYLET_HEALTH_URL}" <<'PY' 2>/dev/null
import sys
import urllib.request

with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
    sys.exit(0 if response.read().strip() == b"success" else 1)
PY
    do
        if ((SECONDS >= deadline)); then
            log "the Ray node did not answer ${RAYLET_HEALTH_URL} within ${NODE_WAIT_S} s"
            return 1
        fi
        sleep 2
    done
    log "the Ray node is up"
}

serve() {
    if [[ -n "${KUBERAY_GEN_RAY_START_CMD:-}" ]]; then
        local command
        command="$(start_command_without_block "${KUBERAY_GEN_RAY_START_CMD}")"
        log "starting the Ray node:${command}"
        # bash -c, as KubeRay runs it: the command quotes JSON (--resources) for a shell.
        bash -c "${command}"
        wait_for_node
    fi
    exec splitserve serve "$@"
}

node() {
    if [[ -z "${KUBERAY_GEN_RAY_START_CMD:-}" ]]; then
        log "node needs KubeRay's \$KUBERAY_GEN_RAY_START_CMD (run it in a RayCluster pod)"
        return 2
    fi
    exec bash -c "${KUBERAY_GEN_RAY_START_CMD}"
}

main() {
    if (($# == 0)); then
        usage
        return 2
    fi
    raise_open_files
    case "$1" in
        serve)
            shift
            serve "$@"
            ;;
        node)
            node
            ;;
        *)
            exec "$@"
            ;;
    esac
}

main "$@"
