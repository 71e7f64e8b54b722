#!/usr/bin/env bash
# Build the gateway and model-server images without a Docker daemon or a public registry, run each
# image's entrypoint, and check them end to end:
#
#   docker/build-local.sh            # as root: installs buildah and debootstrap (Debian) when missing
#
# 1. a Python 3.11 base image made from Debian packages with debootstrap (no registry needed);
# 2. docker/Dockerfile and docker/Dockerfile.kserve built on it with buildah (chroot isolation);
# 3. each image's entrypoint run with `buildah run` (podman run cannot set rlimits here), on loopback;
# 4. checks: the KServe image is ready, the gateway image in front of it answers /readyz and classifies
#    the example digit (a 7) through POST /classify, and the gateway image holds no torch.
# Sizes and build times go to docs/results/images-build-local.json (or $OUT).
#
# MAGNET_BUILD_CUDA=1 also builds docker/Dockerfile.cuda as far as this machine allows: no CUDA base image
# can be made offline, so on the same Debian base with CUDA 13 and cuDNN from PyPI (ORT_GPU_EXTRAS);
# checks that onnxruntime lists the CUDA provider, that every library the provider links against
# resolves in the image except the driver (libcuda.so.1, which the NVIDIA container toolkit mounts
# from the host), and that the entrypoint on MAGNET_DEVICE=cuda without a GPU falls back to the CPU
# and classifies the example digit. No GPU runs here: CUDA inference itself is not checked.
#
# MAGNET_REQUIRE_IMAGES=1 (the CI step sets it on root runners) turns every "cannot run here" into a
# failure instead of a skip. A TLS-intercepting proxy's CA (this machine's system bundle) is bind-mounted
# for the build steps that run pip and never baked into the images.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/docs/results/images-build-local.json}
WORK=${WORK:-/var/tmp/magnet-images}
BASE=localhost/magnet-python:3.11-bookworm
API_PORT=${API_PORT:-18000}
OP_PORT=${OP_PORT:-18002}
KSERVE_PORT=${KSERVE_PORT:-18080}
CUDA_PORT=${CUDA_PORT:-18010}
CUDA_OP_PORT=${CUDA_OP_PORT:-18012}

skip() {
  if [ "${MAGNET_REQUIRE_IMAGES:-0}" = 1 ]; then echo "build-local: FAILED: $*" >&2; exit 1; fi
  echo "build-local: skipped: $*" >&2; exit 0
}

[ "$(id -u)" = 0 ] || skip "needs root (buildah with chroot isolation, debootstrap)"
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  command -v apt-get >/dev/null || skip "buildah/debootstrap missing and no apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null; } \
    || skip "cannot install buildah and debootstrap"
fi
CA=/etc/ssl/certs/ca-certificates.crt
mkdir -p "$WORK"
now() { date +%s.%N; }
secs() { python3 -c "print(round($2 - $1, 1))"; }

# 1. the base: Debian bookworm minbase + python3.11, imported as an image
t0=$(now)
if ! buildah inspect "$BASE" >/dev/null 2>&1; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || skip "debootstrap failed (see $WORK/debootstrap.log)"
  rm -f "$WORK"/rootfs/usr/lib/python3*/EXTERNALLY-MANAGED
  ln -sf python3 "$WORK/rootfs/usr/bin/python"
  ln -sf pip3 "$WORK/rootfs/usr/bin/pip"
  chroot "$WORK/rootfs" apt-get clean
  tar -C "$WORK/rootfs" -c . | buildah import - "$BASE" >/dev/null 2>&1 \
    || { ctr=$(buildah from scratch); mnt=$(buildah mount "$ctr"); cp -a "$WORK/rootfs/." "$mnt/";
         buildah umount "$ctr" >/dev/null; buildah commit -q "$ctr" "$BASE" >/dev/null; buildah rm "$ctr" >/dev/null; }
fi
t_base=$(secs "$t0" "$(now)")

# 2. the images, on that base; the proxy's CA only for the build's pip steps
build() {  # NAME DOCKERFILE
  local t; t=$(now)
  # the host's CA bundle over the image's own during the build only (Debian's pip reads the system
  # bundle): nothing of it stays in the image
  buildah bud --isolation chroot --format docker -q -f "$2" --build-arg BASE="$BASE" \
    -v "$CA:/etc/ssl/certs/ca-certificates.crt:ro" -t "$1" . >"$WORK/$1.log" 2>&1 \
    || { tail -20 "$WORK/$1.log" >&2; echo "build-local: FAILED: building $1" >&2; exit 1; }
  secs "$t" "$(now)"
}
t_gateway=$(build magnet-gateway:local docker/Dockerfile)
t_kserve=$(build magnet-kserve:local docker/Dockerfile.kserve)

size() { buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | awk -v n="localhost/$1" '$1 == n {print $2" "$3}'; }

# 3. run the entrypoints (KServe first, then the gateway in front of it)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; buildah rm --all >/dev/null 2>&1 || true; }
trap cleanup EXIT
run() {  # IMAGE USER "ENV..." ARGS...: the image's entrypoint with ARGS, as USER, with its ENV plus ENV
  local image=$1 user=$2 extra=$3; shift 3
  local ctr; ctr=$(buildah from -q "$image")
  local entry env
  entry=$(buildah inspect --type container "$ctr" | python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["OCIv1"]["config"]["Entrypoint"]))')
  env=$(buildah inspect --type container "$ctr" | python3 -c 'import json,sys; print(" ".join("--env " + e for e in json.load(sys.stdin)["OCIv1"]["config"].get("Env", [])))')
  # shellcheck disable=SC2086
  buildah run --isolation chroot --user "$user" $env $extra "$ctr" -- $entry "$@" >"$WORK/run-${image%%:*}.log" 2>&1 &
  pids+=($!)
}
wait_for() {  # URL SECONDS
  for _ in $(seq "$2"); do
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null && return 0
    sleep 1
  done
  echo "build-local: FAILED: $1 not ready" >&2; tail -30 "$WORK"/run-*.log >&2; exit 1
}
run magnet-kserve:local kserve "" --model-file /models/mnist/classifier.onnx --model-name mnist --http-port "$KSERVE_PORT"
wait_for "http://127.0.0.1:$KSERVE_PORT/v2/health/ready" 120
run magnet-gateway:local magnet "--env MAGNET_PORT=$API_PORT --env MAGNET_OPERATOR_PORT=$OP_PORT --env MAGNET_HOST=127.0.0.1 \
--env MAGNET_UPSTREAM=http://127.0.0.1:$KSERVE_PORT --env MAGNET_UPSTREAM_MODEL=mnist --env MAGNET_WORKERS=1"
wait_for "http://127.0.0.1:$API_PORT/readyz" 120

# 4. checks
digit=$(base64 -w0 examples/mnist-test-0-label-7.png)
classify() {  # [PORT]: the example digit through the gateway on PORT (default $API_PORT); prints the answer
  python3 - "http://127.0.0.1:${1:-$API_PORT}/classify" "$digit" <<'EOF'
import json, sys, urllib.request
body = json.dumps({"images": [sys.argv[2]]}).encode()
request = urllib.request.Request(sys.argv[1], body, {"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=30).read().decode())
EOF
}
is_seven() {  # ANSWER: the first result accepted and labelled 7
  python3 -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; sys.exit(0 if (not r["rejected"] and r["label"] == 7) else 1)' <<<"$1"
}
answer=$(classify)
is_seven "$answer" \
  || { echo "build-local: FAILED: /classify answered $answer" >&2; exit 1; }
ctr=$(buildah from -q magnet-gateway:local)
buildah run --isolation chroot "$ctr" -- python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
  || { echo "build-local: FAILED: torch is in the gateway image" >&2; exit 1; }
for image in magnet-gateway:local magnet-kserve:local; do
  if buildah inspect --type image "$image" | grep -q 'PIP_CERT\|SSL_CERT_FILE'; then
    echo "build-local: FAILED: $image carries the build's CA settings" >&2; exit 1
  fi
done

# 5. optional: the CUDA image (see the header)
CUDA_REPORT='null'
if [ "${MAGNET_BUILD_CUDA:-0}" = 1 ]; then
  t_cuda=$(now)
  buildah bud --isolation chroot --format docker -q -f docker/Dockerfile.cuda --build-arg BASE="$BASE" \
    --build-arg ORT_GPU_EXTRAS='[cuda,cudnn]' -v "$CA:/etc/ssl/certs/ca-certificates.crt:ro" \
    -t magnet-gateway:cuda-local . >"$WORK/magnet-gateway-cuda.log" 2>&1 \
    || { tail -20 "$WORK/magnet-gateway-cuda.log" >&2; echo "build-local: FAILED: building magnet-gateway:cuda-local" >&2; exit 1; }
  t_cuda=$(secs "$t_cuda" "$(now)")
  if buildah inspect --type image magnet-gateway:cuda-local | grep -q 'PIP_CERT\|SSL_CERT_FILE'; then
    echo "build-local: FAILED: magnet-gateway:cuda-local carries the build's CA settings" >&2; exit 1
  fi
  ctr=$(buildah from -q magnet-gateway:cuda-local)
  libs=$(buildah run --isolation chroot "$ctr" -- python -c '
import glob, json, os, subprocess, onnxruntime as ort
here = os.path.dirname(ort.__file__)
provider = os.path.join(here, "capi", "libonnxruntime_providers_cuda.so")
paths = sorted(glob.glob(os.path.join(os.path.dirname(here), "nvidia", "*", "lib")))
env = {**os.environ, "LD_LIBRARY_PATH": ":".join(paths)}
out = subprocess.run(["ldd", provider], env=env, capture_output=True, text=True).stdout
print(json.dumps({"providers": ort.get_available_providers(), "onnxruntime": ort.__version__,
                  "nvidia_lib_dirs": len(paths), "linked": len(out.splitlines()),
                  "unresolved": sorted({l.split()[0] for l in out.splitlines() if "not found" in l})}))') \
    || { echo "build-local: FAILED: inspecting the CUDA image" >&2; exit 1; }
  echo "$libs" | python3 -c 'import json,sys; r=json.load(sys.stdin); sys.exit(0 if "CUDAExecutionProvider" in r["providers"] and r["linked"] > 5 and set(r["unresolved"]) <= {"libcuda.so.1"} else 1)' \
    || { echo "build-local: FAILED: the CUDA image: $libs" >&2; exit 1; }
  run magnet-gateway:cuda-local magnet "--env MAGNET_PORT=$CUDA_PORT --env MAGNET_OPERATOR_PORT=$CUDA_OP_PORT \
--env MAGNET_HOST=127.0.0.1 --env MAGNET_WORKERS=1 --env MAGNET_DEVICE=cuda"
  wait_for "http://127.0.0.1:$CUDA_PORT/readyz" 120
  ready=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "http://127.0.0.1:$CUDA_PORT/readyz")
  cuda_answer=$(classify "$CUDA_PORT")
  is_seven "$cuda_answer" \
    || { echo "build-local: FAILED: the CUDA image's /classify answered $cuda_answer" >&2; exit 1; }
  CUDA_REPORT=$(LIBS="$libs" READY="$ready" T="$t_cuda" SIZE="$(size magnet-gateway:cuda-local)" python3 -c '
import json, os
e = os.environ
print(json.dumps({"build_seconds": float(e["T"]), "size": e["SIZE"], "ort_gpu_extras": "[cuda,cudnn]",
                  "image": json.loads(e["LIBS"]), "readyz_without_gpu": json.loads(e["READY"]),
                  "classify_label": 7}))')
fi

ANSWER="$answer" T_BASE="$t_base" T_GATEWAY="$t_gateway" T_KSERVE="$t_kserve" BASE="$BASE" \
SIZE_GATEWAY="$(size magnet-gateway:local)" SIZE_KSERVE="$(size magnet-kserve:local)" CUDA_REPORT="$CUDA_REPORT" \
python3 - "$OUT" <<'EOF'
import json, os, sys
e = os.environ
report = {"base": f"{e['BASE']} (debootstrap bookworm minbase + python3)", "base_seconds": float(e["T_BASE"]),
          "images": {"magnet-gateway": {"build_seconds": float(e["T_GATEWAY"]), "size": e["SIZE_GATEWAY"]},
                     "magnet-kserve": {"build_seconds": float(e["T_KSERVE"]), "size": e["SIZE_KSERVE"]}},
          "checks": {"kserve_ready": True, "gateway_readyz": True, "classify_answer": json.loads(e["ANSWER"]),
                     "gateway_has_torch": False, "build_ca_left_in_images": False}}
cuda = json.loads(e["CUDA_REPORT"])
report["images"]["magnet-gateway-cuda"] = cuda or "not built (MAGNET_BUILD_CUDA unset)"
open(sys.argv[1], "w").write(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
EOF
