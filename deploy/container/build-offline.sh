#!/usr/bin/env bash
# Builds deploy/container/Containerfile where no container registry can be
# reached (so deploy/container/build.sh cannot pull its base images), then
# runs examples/pipeline.toml inside the image:
#   deploy/container/build-offline.sh [TAG]        (default localhost/rlhfd:0.1.0)
# The two base images come from Debian's archive instead (mmdebstrap):
#   localhost/debian:bookworm-slim   minbase bookworm, as the official slim image
#   localhost/rust:1.95-bookworm     minbase bookworm + build-essential,
#                                    python3-venv, git and the rustup toolchain
#                                    `rustc` here runs (at /usr/local/rust)
# and the build passes them as RUNTIME_IMAGE / RUST_IMAGE. The build still
# needs PyPI and crates.io. Local CAs (/usr/local/share/ca-certificates, e.g.
# an egress proxy's) go into the build image. Needs root, podman and
# mmdebstrap (installed from Debian when missing). PODMAN_RUN_ARGS adds
# options to podman build and run (default: `--ulimit nofile=1024:1024
# --ulimit nproc=1024:1024`, for hosts that refuse podman's own limits);
# PODMAN_RUNTIME picks the OCI runtime (crun cannot run on cgroup v1 hosts:
# runc, which this script then installs, can).
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-localhost/rlhfd:0.1.0}
read -ra run_args <<<"${PODMAN_RUN_ARGS:---ulimit nofile=1024:1024 --ulimit nproc=1024:1024}"
runtime=${PODMAN_RUNTIME:-runc}
need=()
command -v podman >/dev/null || need+=(podman)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v "$runtime" >/dev/null || need+=("$runtime")
if ((${#need[@]})); then DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2; fi
podman=(podman --runtime "$runtime")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mirror=http://deb.debian.org/debian

if ! "${podman[@]}" image exists localhost/debian:bookworm-slim; then
  mmdebstrap --variant=minbase bookworm "$tmp/slim.tar" "$mirror" >&2
  "${podman[@]}" import --change 'CMD ["bash"]' "$tmp/slim.tar" localhost/debian:bookworm-slim >&2
fi
if ! "${podman[@]}" image exists localhost/rust:1.95-bookworm; then
  toolchain=$(rustc --print sysroot)
  mmdebstrap --variant=minbase --include=build-essential,python3-venv,ca-certificates,git,pkg-config \
    --customize-hook='mkdir -p "$1/usr/local/rust"' --customize-hook="sync-in $toolchain /usr/local/rust" \
    bookworm "$tmp/build.tar" "$mirror" >&2
  mkdir -p "$tmp/ca"
  cp /usr/local/share/ca-certificates/*.crt "$tmp/ca/" 2>/dev/null || true
  "${podman[@]}" import --change 'CMD ["bash"]' "$tmp/build.tar" localhost/rust:base >&2
  cat >"$tmp/ca/Containerfile" <<'CF'
FROM localhost/rust:base
COPY . /usr/local/share/ca-certificates/
RUN rm /usr/local/share/ca-certificates/Containerfile && update-ca-certificates
ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
CF
  "${podman[@]}" build "${run_args[@]}" --network=host -t localhost/rust:1.95-bookworm "$tmp/ca" >&2
fi

"${podman[@]}" build "${run_args[@]}" --network=host \
  --build-arg RUST_IMAGE=localhost/rust:1.95-bookworm --build-arg RUNTIME_IMAGE=localhost/debian:bookworm-slim \
  -f deploy/container/Containerfile -t "$tag" .
"${podman[@]}" images "$tag"

# The pipeline example inside the image: a coordinator and 2 CPU workers
# (rlhfctl up), its placement fitted to them, the report's accuracy table.
# The repo is mounted at its own path, read-only, for the job's files.
"${podman[@]}" run --rm "${run_args[@]}" --network=none -v "$PWD:$PWD:ro" -e RLHF_DATA_DIR=/var/lib/rlhfd/d \
  --entrypoint bash "$tag" -c "set -e
    for b in rlhf-coordinator rlhf-worker rlhfctl; do ! ldd /usr/local/bin/\$b | grep 'not found'; done
    rlhfctl up --cpu-workers 2 >/dev/null
    rlhfctl workers
    id=\$(rlhfctl submit --fit-placement --wait $PWD/examples/pipeline.toml 2>/tmp/watch.log | tail -n 1)
    tail -n 1 /tmp/watch.log
    rlhfctl report \$id --out /tmp/report | sed -n '/Accuracy, choice mode/,/^| sft/p'
    rlhfctl down >/dev/null"
echo "build-offline.sh: $tag built and ran the pipeline" >&2
