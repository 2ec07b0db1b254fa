#!/usr/bin/env bash
# Builds the image deploy/k8s/rlhfd.yaml runs, from the repo root's files:
#   deploy/container/build.sh [TAG]          (default rlhfd:0.1.0)
# Needs podman or docker (CONTAINER_ENGINE picks one), a registry for the
# base images (RUST_IMAGE / RUNTIME_IMAGE build args), and PyPI and crates.io
# inside the build. Push the tag where your cluster pulls from and set it in
# the manifest. Ends with a smoke run of the three binaries in the image.
set -euo pipefail
cd "$(dirname "$0")/../.."
tag=${1:-rlhfd:0.1.0}
engine=${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}
[[ -n $engine ]] || { echo "build.sh: needs podman or docker (or CONTAINER_ENGINE)" >&2; exit 2; }
"$engine" build -f deploy/container/Containerfile -t "$tag" .
for b in rlhf-coordinator rlhf-worker rlhfctl; do
  "$engine" run --rm --entrypoint "/usr/local/bin/$b" "$tag" --help >/dev/null
done
echo "build.sh: built $tag; the three binaries start in it" >&2
