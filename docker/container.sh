#!/usr/bin/env bash
# Build, lock, push, pull, find and run the kit's images with docker or podman. docker/images.mk
# calls this; it can be called directly as well. IMAGE is a name of docker/images.py's table.
#
#   docker/container.sh engine                 print the engine in use (docker or podman)
#   docker/container.sh build  IMAGE           build docker/Dockerfile for IMAGE as localhost/llm-pruning-kit/IMAGE:local
#   docker/container.sh local-base IMAGE       make (once) and print the debootstrapped base of IMAGE's python
#   docker/container.sh lock   IMAGE           regenerate docker/IMAGE/*.lock from the .in files (pip-compile)
#   docker/container.sh push   IMAGE           push the local build to REGISTRY, record its digest in images.lock.json
#   docker/container.sh pull   IMAGE           pull REGISTRY/IMAGE@DIGEST (digest from docker/images.lock.json), verify it
#   docker/container.sh ref    IMAGE           print the reference a run uses (by digest or local image id)
#   docker/container.sh exists IMAGE           exit 0 when an engine and a runnable image exist
#   docker/container.sh run    IMAGE -- CMD... run CMD in the image with caches, results and GPUs wired
#   docker/container.sh smoke  IMAGE           run IMAGE's smoke commands (docker/images.py) inside it
#
# Settings (environment; images.mk exports its make variables of the same names):
#   CONTAINER_ENGINE        docker | podman (or a path); default: docker when its daemon answers, else podman
#   CONTAINER_ENGINE_FLAGS  global engine flags, e.g. "--root DIR --runroot DIR" for podman
#   CONTAINER_BUILD_FLAGS   extra flags for `build` (e.g. --network host)
#   BASE_IMAGE              replaces the image's base from docker/images.py: a reference pinned by
#                           digest, a local image, or `local` (the debootstrapped base, made on first use)
#   IMAGE_CONTEXT           build context (default: the repository root)
#   REGISTRY                registry path of pushed images, host[:port]/namespace (default: the lock file's)
#   TAG                     tag of a push (default: git-<commit>); runs never use tags
#   LPC_IMAGE               image reference to run instead of the lock's digest / the local build
#   LPC_IMAGES_LOCK         the lock file (default docker/images.lock.json)
#   LOCK_PYTHON             interpreter of `lock` (default: pythonX.Y of the image, on PATH or under pyenv)
#   HF_HOME                 host Hugging Face cache, mounted at /cache/huggingface (default ~/.cache/huggingface)
#   LPC_CACHE               host cache of the kit (smoke model), mounted at /cache/lpc (default ~/.cache/lpc)
#   CONTAINER_RESULTS_DIR   host results directory, mounted at /workspace/results (default <repo>/results)
#   CONTAINER_GPUS          auto | 1 | 0: pass the GPUs (auto: when `nvidia-smi -L` lists one)
#   CONTAINER_RUN_FLAGS     extra flags for `run` (e.g. --memory 16g)
# HF_TOKEN is passed by name only (`-e HF_TOKEN`): its value stays in the environment.
#
# A problem with the input or the machine (unknown image, no engine, no pushed digest, a registry
# without that digest, a manifest that does not match its digest) is one line on stderr and exit 2.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "${here}/.." && pwd)"
local_prefix="localhost/llm-pruning-kit"
PIP_TOOLS_PIN="pip-tools==7.6.2"

fail() { echo "$*" >&2; exit 2; }

images() { python3 "${here}/images.py" "$@"; }

engine() {
    if [ -n "${CONTAINER_ENGINE:-}" ]; then echo "${CONTAINER_ENGINE}"; return; fi
    if command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; then echo docker; return; fi
    if command -v podman >/dev/null 2>&1; then echo podman; return; fi
    echo ""
}

ENGINE="$(engine)"
KIND="$(basename "${ENGINE:-none}")"   # docker or podman (CONTAINER_ENGINE may be a path)
# shellcheck disable=SC2206  # engine flags are meant to be split on spaces
FLAGS=(${CONTAINER_ENGINE_FLAGS:-})

need_engine() {
    if [ -z "${ENGINE}" ]; then
        if command -v docker >/dev/null 2>&1; then
            fail "no container engine: docker's daemon does not answer and podman is not installed (or set CONTAINER_ENGINE)"
        fi
        fail "no container engine: install docker or podman (or set CONTAINER_ENGINE)"
    fi
    command -v "${ENGINE}" >/dev/null 2>&1 || fail "no container engine: '${ENGINE}' (CONTAINER_ENGINE) is not installed"
}

eng() {
    need_engine
    "${ENGINE}" ${FLAGS[@]+"${FLAGS[@]}"} "$@"
}

check_image() {
    [ -n "${1:-}" ] || fail "usage: container.sh $2 IMAGE"
    case " $(images list) " in
        *" $1 "*) ;;
        *) fail "unknown image '$1' (docker/images.py has: $(images list))" ;;
    esac
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

# Registries on the loopback interface speak plain HTTP (a test registry, a local mirror); docker's
# daemon treats 127.0.0.0/8 as insecure by itself, podman is told per call.
tls_flags() {
    [ "${KIND}" = podman ] || return 0
    case "$1" in
        localhost/*|localhost:*|127.*) echo "--tls-verify=false" ;;
    esac
}

# One line saying why an engine's pull or push failed, from its output.
why() {
    local out="$1"
    if grep -qi "manifest unknown" <<<"${out}"; then
        echo "the registry has no manifest with that digest (never pushed there, or deleted)"
    elif grep -qiE "digest.*(did not match|does not match|mismatch)|(did not match|does not match|mismatch).*digest|invalid checksum digest" <<<"${out}"; then
        echo "what the registry sent does not match the digest in the lock file (tampered or corrupted); nothing was kept"
    elif grep -qiE "connection refused|no such host|i/o timeout|server gave HTTP response to HTTPS" <<<"${out}"; then
        echo "the registry cannot be reached: $(grep -iE 'connection refused|no such host|i/o timeout|HTTP response' <<<"${out}" | tail -n 1 | cut -c1-200)"
    else
        grep -v '^\s*$' <<<"${out}" | tail -n 1 | cut -c1-300
    fi
}

build() {
    local image="$1" sha base kv
    need_engine
    local args=(build -f "${here}/Dockerfile" -t "${local_prefix}/${image}:local")
    sha="$(git -C "${root}" rev-parse HEAD 2>/dev/null || echo unknown)"
    while IFS= read -r kv; do
        case "${kv}" in BASE_IMAGE=*) base="${kv#BASE_IMAGE=}"; continue ;; esac
        args+=(--build-arg "${kv}")
    done < <(images build-args "${image}" "${sha}")
    if [ "${BASE_IMAGE:-}" = local ]; then
        base="$(local_base "${image}")"
    elif [ -n "${BASE_IMAGE:-}" ]; then
        base="${BASE_IMAGE}"
    fi
    args+=(--build-arg "BASE_IMAGE=${base}")
    # SHELL is an instruction of the docker format only.
    if [ "${KIND}" = podman ]; then args+=(--format docker); fi
    # shellcheck disable=SC2206  # extra build flags are meant to be split on spaces
    local extra=(${CONTAINER_BUILD_FLAGS:-})
    eng "${args[@]}" ${extra[@]+"${extra[@]}"} "${IMAGE_CONTEXT:-${root}}"
}

# The local base: debootstrap --variant=minbase of the suite docker/images.py names for the image,
# with the host's CA certificates (HTTPS may pass a re-signing proxy that only the host trusts).
local_base() {
    local image="$1" key value
    need_engine
    local SUITE="" REF="" MIRROR="" COMPONENTS="" KEYRING_URL="" KEYRING_SHA256="" KEYRING_PATH="" SCRIPT=""
    while IFS='=' read -r key value; do
        case "${key}" in
            SUITE|REF|MIRROR|COMPONENTS|KEYRING_URL|KEYRING_SHA256|KEYRING_PATH|SCRIPT) printf -v "${key}" '%s' "${value}" ;;
        esac
    done < <(images local-base "${image}")
    if eng image inspect "${REF}" >/dev/null 2>&1; then echo "${REF}"; return; fi
    [ "$(id -u)" = 0 ] || fail "local base ${REF}: debootstrap needs root"
    command -v debootstrap >/dev/null 2>&1 || fail "local base ${REF}: debootstrap is not installed (apt-get install -y debootstrap)"
    local work rootfs log opts=(--variant=minbase "--components=${COMPONENTS}")
    work="$(mktemp -d "${LPC_BASE_WORKDIR:-/var/tmp}/lpc-base-XXXXXX")"
    # shellcheck disable=SC2064  # expand now: the directory to remove is this one
    trap "rm -rf '${work}'" EXIT
    rootfs="${work}/rootfs"; log="${work}/debootstrap.log"
    if [ -n "${KEYRING_URL}" ]; then
        curl -fsSL -o "${work}/keyring.deb" "${KEYRING_URL}" || fail "local base ${REF}: cannot download ${KEYRING_URL}"
        echo "${KEYRING_SHA256}  ${work}/keyring.deb" | sha256sum -c --status \
            || fail "local base ${REF}: ${KEYRING_URL} does not have the sha256 docker/images.py pins"
        dpkg-deb -x "${work}/keyring.deb" "${work}/keyring"
        opts+=(--keyring="${work}/keyring/${KEYRING_PATH}")
    fi
    # A suite the host's debootstrap has no script for is named with the script it shares.
    local script=()
    if [ -n "${SCRIPT}" ]; then script=("${DEBOOTSTRAP_DIR:-/usr/share/debootstrap}/scripts/${SCRIPT}"); fi
    echo "local base ${REF}: debootstrap ${SUITE} from ${MIRROR}" >&2
    debootstrap "${opts[@]}" "${SUITE}" "${rootfs}" "${MIRROR}" ${script[@]+"${script[@]}"} >"${log}" 2>&1 \
        || fail "local base ${REF}: debootstrap ${SUITE} failed: $(tail -n 1 "${log}")"
    if [ -d /usr/local/share/ca-certificates ]; then
        mkdir -p "${rootfs}/usr/local/share/ca-certificates"
        find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "${rootfs}/usr/local/share/ca-certificates/" \;
    fi
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        mkdir -p "${rootfs}/etc/ssl/certs"
        cp /etc/ssl/certs/ca-certificates.crt "${rootfs}/etc/ssl/certs/ca-certificates.crt"
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "${rootfs}/etc/pip.conf"
    fi
    tar -C "${rootfs}" -c . | eng import - "${REF}" >/dev/null
    rm -rf "${work}"
    trap - EXIT
    echo "${REF}"
}

# A working pythonX.Y: LOCK_PYTHON, else on PATH, else pyenv's (whose shims exist but refuse to run
# a version that is not selected).
lock_python() {
    local want="$1" c
    if [ -n "${LOCK_PYTHON:-}" ]; then echo "${LOCK_PYTHON}"; return; fi
    for c in "$(command -v "python${want}" || true)" "${PYENV_ROOT:-${HOME}/.pyenv}"/versions/"${want}".*/bin/"python${want}"; do
        if [ -n "${c}" ] && [ -x "${c}" ] && "${c}" --version >/dev/null 2>&1; then echo "${c}"; return; fi
    done
    fail "lock: needs python${want} (the image's python): put it on PATH or set LOCK_PYTHON=/path/to/python${want}"
}

# PyPI only: a machine's pip.conf or PIP_* settings may add indexes, wheel folders or constraints.
pypi_only() {
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null "$@"
}

lock() {
    local image="$1" py interp venv name
    py="$(images get "${image}" python)"
    interp="$(lock_python "${py}")"
    venv="${LOCK_VENV_DIR:-${root}/build/lock-tools}/py${py}"
    if [ ! -x "${venv}/bin/pip-compile" ]; then
        "${interp}" -m venv "${venv}"
        pypi_only "${venv}/bin/pip" install -q "${PIP_TOOLS_PIN}"
    fi
    cd "${here}/${image}"
    for name in requirements-bootstrap requirements; do
        pypi_only "${venv}/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --no-emit-index-url \
            --index-url https://pypi.org/simple --strip-extras -o "${name}.lock" "${name}.in"
        # the pip that resolves the image's lock is the one the image bootstraps
        if [ "${name}" = requirements-bootstrap ]; then
            pypi_only "${venv}/bin/pip" install -q --require-hashes --no-deps -r requirements-bootstrap.lock
        fi
    done
    echo "docker/${image}: requirements.lock and requirements-bootstrap.lock written with python ${py} ($("${interp}" --version 2>&1))"
}

push() {
    local image="$1" registry tag src dest digest sha out tls
    need_engine
    registry="${REGISTRY:-}"
    if [ -z "${registry}" ]; then
        registry="$(python3 "${here}/lockinfo.py" get "${image}" registry)"
        [ "${registry}" != null ] || fail "push ${image}: give REGISTRY=host[:port]/namespace (the lock file records no push of ${image})"
    fi
    python3 "${here}/lockinfo.py" valid-registry "${registry}" >/dev/null || fail "push ${image}: REGISTRY '${registry}' is not host[:port]/namespace in lower case"
    src="${local_prefix}/${image}:local"
    sha="$(eng image inspect --format '{{index .Config.Labels "org.opencontainers.image.revision"}}' "${src}" 2>/dev/null)" \
        || fail "push ${image}: there is no local build ${src}; run 'make image-${image}' first"
    tag="${TAG:-git-$(cut -c1-12 <<<"${sha}")}"
    dest="${registry}/${image}:${tag}"
    tls="$(tls_flags "${registry}")"
    if [ "${KIND}" = podman ]; then
        local digestfile
        digestfile="$(mktemp)"
        # shellcheck disable=SC2086  # tls is empty or one flag
        out="$(eng push ${tls} --digestfile "${digestfile}" "${src}" "${dest}" 2>&1)" || { rm -f "${digestfile}"; fail "push ${dest}: $(why "${out}")"; }
        digest="$(cat "${digestfile}")"; rm -f "${digestfile}"
    else
        eng tag "${src}" "${dest}"
        out="$(eng push "${dest}" 2>&1)" || fail "push ${dest}: $(why "${out}")"
        digest="$(eng image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "${dest}" \
                  | sed -n "s|^${registry}/${image}@||p" | head -n 1)"
    fi
    case "${digest}" in sha256:*) ;; *) fail "push ${dest}: the engine reported no digest" ;; esac
    python3 "${here}/lockinfo.py" set "${image}" --digest "${digest}" --tag "${tag}" --git-sha "${sha}" \
        --registry "${registry}"
    echo "pushed ${registry}/${image}@${digest} (tag ${tag}); recorded in ${LPC_IMAGES_LOCK:-docker/images.lock.json}"
}

# Pull exactly the lock's digest, then check what arrived: the engine lists that digest for it and
# it is the image it claims to be.
pull() {
    local image="$1" ref out digests title
    ref="$(lock_ref "${image}")"
    [ -n "${ref}" ] || fail "pull ${image}: docker/images.lock.json has no pushed digest for '${image}' (digest null); build it with 'make image-${LPC_METHOD:-${image}}' instead"
    need_engine
    # shellcheck disable=SC2046  # tls_flags prints nothing or one flag
    out="$(eng pull $(tls_flags "${ref}") "${ref}" 2>&1)" || fail "pull ${ref}: $(why "${out}")"
    digests="$(eng image inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "${ref}" 2>/dev/null || true)"
    grep -qF "@${ref##*@}" <<<"${digests}" || fail "pull ${ref}: the pulled image does not carry digest ${ref##*@}"
    title="$(eng image inspect --format '{{index .Config.Labels "org.opencontainers.image.title"}}' "${ref}")"
    [ "${title}" = "llm-pruning-kit/${image}" ] \
        || fail "pull ${ref}: the image is '${title}', not llm-pruning-kit/${image}"
    echo "pulled ${ref}"
}

run() {
    local image="$1"; shift
    [ "${1:-}" = "--" ] && shift
    [ "$#" -gt 0 ] || fail "usage: container.sh run IMAGE -- COMMAND..."
    need_engine
    local ref
    ref="$(resolve_ref "${image}")"
    [ -n "${ref}" ] || fail "run ${image}: no image: docker/images.lock.json has digest null for '${image}' (not pushed yet) and there is no local build ${local_prefix}/${image}:local; run 'make image-${LPC_METHOD:-${image}}' (or set LPC_IMAGE)"
    local hf_home lpc_cache results uid gid gpus
    hf_home="${HF_HOME:-${HOME}/.cache/huggingface}"
    lpc_cache="${LPC_CACHE:-${HOME}/.cache/lpc}"
    results="${CONTAINER_RESULTS_DIR:-${root}/results}"
    mkdir -p "${hf_home}" "${lpc_cache}" "${results}"
    uid="$(id -u)"; gid="$(id -g)"
    local args=(run --rm
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
    local extra=(${CONTAINER_RUN_FLAGS:-})
    eng "${args[@]}" ${extra[@]+"${extra[@]}"} "${ref}" "$@"
}

# The image's smoke commands, one container each; stops at the first that fails.
smoke() {
    local image="$1" cmd words start
    while IFS= read -r cmd; do
        [ -n "${cmd}" ] || continue
        read -ra words <<<"${cmd}"
        echo "smoke ${image}: ${cmd}"
        start="$(date +%s)"
        run "${image}" -- "${words[@]}" </dev/null
        echo "smoke ${image}: $(( $(date +%s) - start )) s: ${cmd}"
    done < <(images smoke "${image}")
}

main() {
    local cmd="${1:-}" ref
    shift || true
    case "${cmd}" in
    engine)
        [ -n "${ENGINE}" ] || exit 1
        echo "${KIND}"
        ;;
    build|local-base|lock|push|pull|ref|smoke)
        check_image "${1:-}" "${cmd}"
        case "${cmd}" in
            build) build "$1" ;;
            local-base) local_base "$1" ;;
            lock) lock "$1" ;;
            push) push "$1" ;;
            pull) pull "$1" ;;
            smoke) smoke "$1" ;;
            ref) ref="$(resolve_ref "$1")"; [ -n "${ref}" ] || exit 1; echo "${ref}" ;;
        esac
        ;;
    exists)
        [ -n "${1:-}" ] && [[ " $(images list) " == *" $1 "* ]] || exit 1
        [ -n "${ENGINE}" ] && command -v "${ENGINE}" >/dev/null 2>&1 || exit 1
        timeout 20 "${ENGINE}" ${FLAGS[@]+"${FLAGS[@]}"} info >/dev/null 2>&1 || exit 1
        ref="$(resolve_ref "$1")"
        [ -n "${ref}" ] || exit 1
        eng image inspect "${ref}" >/dev/null 2>&1
        ;;
    run)
        check_image "${1:-}" run
        run "$@"
        ;;
    *)
        fail "usage: container.sh engine|build|local-base|lock|push|pull|ref|exists|run|smoke IMAGE [-- COMMAND...]"
        ;;
    esac
}

# One line, read whole before main runs: an edit of this file during a long build cannot derail the end.
main "$@"; exit $?
