#!/usr/bin/env bash
# Build, pull, find and run the kit's images with docker or podman. docker/images.mk calls this;
# it can be called directly as well:
#
#   docker/container.sh engine                 print the engine in use (docker or podman)
#   docker/container.sh build  IMAGE           build docker/IMAGE/Dockerfile as localhost/llm-pruning-kit/IMAGE:local
#   docker/container.sh pull   IMAGE           pull REGISTRY/IMAGE@DIGEST (digest from docker/images.lock.json)
#   docker/container.sh ref    IMAGE           print the reference a run uses (by digest or local image id)
#   docker/container.sh exists IMAGE           exit 0 when an engine and a runnable image exist
#   docker/container.sh run    IMAGE -- CMD... run CMD in the image with caches, results and GPUs wired
#
# Settings (environment; images.mk exports its make variables of the same names):
#   CONTAINER_ENGINE        docker | podman; default: docker when its daemon answers, else podman, else docker
#   CONTAINER_ENGINE_FLAGS  global engine flags, e.g. "--root DIR --runroot DIR" for podman
#   BASE_IMAGE              build arg replacing the Dockerfile's default base (must be pinned by digest
#                           or be a local image)
#   IMAGE_CONTEXT           build context (default: the repository root)
#   REGISTRY                registry path of pushed images (default: the lock file's "registry")
#   LPC_IMAGE               image reference to run instead of the lock's digest / the local build
#   HF_HOME                 host Hugging Face cache, mounted at /cache/huggingface (default ~/.cache/huggingface)
#   LPC_CACHE               host cache of the kit (smoke model), mounted at /cache/lpc (default ~/.cache/lpc)
#   CONTAINER_RESULTS_DIR   host results directory, mounted at /workspace/results (default <repo>/results)
#   CONTAINER_GPUS          auto | 1 | 0: pass the GPUs (auto: when `nvidia-smi -L` lists one)
#   CONTAINER_RUN_FLAGS     extra flags for `run` (e.g. --memory 16g)
# HF_TOKEN is passed by name only (`-e HF_TOKEN`): its value stays in the environment.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/.." && pwd)"
local_prefix="localhost/llm-pruning-kit"

die() { echo "$*" >&2; exit 1; }

engine() {
    if [ -n "${CONTAINER_ENGINE:-}" ]; then echo "${CONTAINER_ENGINE}"; return; fi
    if command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; then echo docker; return; fi
    if command -v podman >/dev/null 2>&1; then echo podman; return; fi
    if command -v docker >/dev/null 2>&1; then echo docker; return; fi
    echo ""
}

ENGINE="$(engine)"
KIND="$(basename "${ENGINE:-none}")"   # docker or podman (CONTAINER_ENGINE may be a path)
# shellcheck disable=SC2206  # engine flags are meant to be split on spaces
FLAGS=(${CONTAINER_ENGINE_FLAGS:-})

eng() {
    [ -n "${ENGINE}" ] || die "no container engine: install docker or podman (or set CONTAINER_ENGINE)"
    "${ENGINE}" ${FLAGS[@]+"${FLAGS[@]}"} "$@"
}

check_image() {
    [ -n "${1:-}" ] || die "usage: container.sh $2 IMAGE"
    [ -f "${here}/$1/Dockerfile" ] || die "no image folder docker/$1 (with a Dockerfile)"
}

lock_ref() {  # REGISTRY/IMAGE@DIGEST, or nothing when the digest is null
    python3 "${here}/lockinfo.py" ref "$1" "${REGISTRY:-}" || true
}

local_id() {  # image id of the local build, or nothing
    eng image inspect --format '{{.Id}}' "${local_prefix}/$1:local" 2>/dev/null || true
}

resolve_ref() {  # the reference a run uses; never a floating tag
    if [ -n "${LPC_IMAGE:-}" ]; then echo "${LPC_IMAGE}"; return; fi
    local ref id
    ref="$(lock_ref "$1")"
    if [ -n "${ref}" ]; then echo "${ref}"; return; fi
    id="$(local_id "$1")"
    if [ -n "${id}" ]; then
        case "${id}" in sha256:*) echo "${id}" ;; *) echo "sha256:${id}" ;; esac
        return
    fi
    echo ""
}

cmd="${1:-}"; shift || true
case "${cmd}" in
engine)
    [ -n "${ENGINE}" ] || exit 1
    echo "${KIND}"
    ;;
build)
    check_image "${1:-}" build
    image="$1"
    args=(build -f "${here}/${image}/Dockerfile" -t "${local_prefix}/${image}:local")
    if [ -n "${BASE_IMAGE:-}" ]; then args+=(--build-arg "BASE_IMAGE=${BASE_IMAGE}"); fi
    sha="$(git -C "${root}" rev-parse HEAD 2>/dev/null || echo unknown)"
    args+=(--build-arg "GIT_SHA=${sha}")
    if [ "${KIND}" = podman ]; then args+=(--format docker); fi
    eng "${args[@]}" "${IMAGE_CONTEXT:-${root}}"
    ;;
pull)
    check_image "${1:-}" pull
    image="$1"
    ref="$(lock_ref "${image}")"
    [ -n "${ref}" ] || die "pull ${image}: docker/images.lock.json has no pushed digest for '${image}' (digest null); build it with 'make image-${LPC_METHOD:-<method>}' instead"
    eng pull "${ref}"
    ;;
ref)
    check_image "${1:-}" ref
    ref="$(resolve_ref "$1")"
    [ -n "${ref}" ] || exit 1
    echo "${ref}"
    ;;
exists)
    check_image "${1:-}" exists 2>/dev/null || exit 1
    [ -n "${ENGINE}" ] || exit 1
    timeout 20 "${ENGINE}" ${FLAGS[@]+"${FLAGS[@]}"} info >/dev/null 2>&1 || exit 1
    ref="$(resolve_ref "$1")"
    [ -n "${ref}" ] || exit 1
    eng image inspect "${ref}" >/dev/null 2>&1
    ;;
run)
    check_image "${1:-}" run
    image="$1"; shift
    [ "${1:-}" = "--" ] && shift
    [ "$#" -gt 0 ] || die "usage: container.sh run IMAGE -- COMMAND..."
    ref="$(resolve_ref "${image}")"
    [ -n "${ref}" ] || die "run ${image}: no image: docker/images.lock.json has digest null for '${image}' (not pushed yet) and there is no local build ${local_prefix}/${image}:local; run 'make image-${LPC_METHOD:-<method>}' (or set LPC_IMAGE)"
    hf_home="${HF_HOME:-${HOME}/.cache/huggingface}"
    lpc_cache="${LPC_CACHE:-${HOME}/.cache/lpc}"
    results="${CONTAINER_RESULTS_DIR:-${root}/results}"
    mkdir -p "${hf_home}" "${lpc_cache}" "${results}"
    uid="$(id -u)"; gid="$(id -g)"
    args=(run --rm
          --user "${uid}:${gid}"
          -v "${hf_home}:/cache/huggingface:rw" -e HF_HOME=/cache/huggingface
          -v "${lpc_cache}:/cache/lpc:rw" -e LPC_CACHE=/cache/lpc
          -v "${results}:/workspace/results:rw"
          -e HF_TOKEN
          -e "LPC_IMAGE_REF=${ref}"
          --entrypoint /usr/bin/env)
    # The image's user is uid 1000; any other uid (to own what it writes on the host) gets a
    # writable HOME.
    if [ "${uid}" != 1000 ]; then args+=(-e HOME=/tmp); fi
    # Rootless podman: keep the caller's uid inside so the bind mounts stay writable.
    if [ "${KIND}" = podman ] && [ "${uid}" != 0 ]; then args+=(--userns=keep-id); fi
    gpus="${CONTAINER_GPUS:-auto}"
    if [ "${gpus}" = auto ]; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpus=1; else gpus=0; fi
    fi
    if [ "${gpus}" = 1 ]; then
        if [ "${KIND}" = podman ]; then args+=(--device nvidia.com/gpu=all); else args+=(--gpus all); fi
        args+=(--shm-size 8g)
    fi
    # shellcheck disable=SC2206  # extra run flags are meant to be split on spaces
    extra=(${CONTAINER_RUN_FLAGS:-})
    eng "${args[@]}" ${extra[@]+"${extra[@]}"} "${ref}" "$@"
    ;;
*)
    die "usage: container.sh engine|build|pull|ref|exists|run IMAGE [-- COMMAND...]"
    ;;
esac
