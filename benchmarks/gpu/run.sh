#!/usr/bin/env bash
# The GPU run of issue #15, on a lent GPU machine, from the repository root (README "On a
# GPU"; /work/shared/GPU.md). It needs .gpu-carry/ from benchmarks/gpu/prepare.sh.
#
#   benchmarks/gpu/run.sh build   CUDA build of llama.cpp's shared libraries and llama-server
#                                 from the carried sdist (~6 min on 16 cores), in the
#                                 background; waits for it up to WAIT_S (default 540 s).
#                                 Run it again to keep waiting.
#   benchmarks/gpu/run.sh bench   writes the 1B-shaped f16 model, runs benchmarks.gpu.run
#                                 (~5 min; results in $OUT: gpu-run.json, raw/, logs/)
#   benchmarks/gpu/run.sh check   only checks what it would use (no build, no GPU needed)
#
# Environment: OUT (default $WORK/out), WORK (/tmp/llamapool-gpu), CUDA_ARCHS (90: H100,
# H200), JOBS (all cores), WAIT_S; anything after `bench` goes to benchmarks.gpu.run.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
CARRY=${CARRY:-$REPO/.gpu-carry}
WORK=${WORK:-/tmp/llamapool-gpu}
OUT=${OUT:-$WORK/out}
CUDA_ARCHS=${CUDA_ARCHS:-90}
JOBS=${JOBS:-$(nproc)}
WAIT_S=${WAIT_S:-540}
MODEL=${MODEL:-$WORK/llama-1b-shape-f16.gguf}

die() { echo "run.sh: $*" >&2; exit 1; }

sdist=$(ls "$CARRY"/llama_cpp_python-*.tar.gz 2>/dev/null | head -n1 || true)
[ -n "$sdist" ] || die "no $CARRY/llama_cpp_python-*.tar.gz: run benchmarks/gpu/prepare.sh where a package registry is reachable, then carry .gpu-carry"
SRC=$WORK/$(basename "$sdist" .tar.gz)
LLAMA_CPP=$SRC/vendor/llama.cpp
BUILD=$LLAMA_CPP/build

unpack() {
  mkdir -p "$WORK"
  [ -d "$SRC" ] || tar xzf "$sdist" -C "$WORK"
}

built() { [ "$(cat "$WORK/build.rc" 2>/dev/null)" = 0 ]; }

build() {
  unpack
  if [ -f "$WORK/build.rc" ] && ! built; then
    tail -n 40 "$WORK/build.log"
    die "the build failed (log above; rm -r $WORK to start again)"
  fi
  if [ ! -f "$WORK/build.rc" ] && [ ! -f "$WORK/build.started" ]; then
    export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
    [ -x "$CUDACXX" ] || die "nvcc not found (set CUDACXX)"
    echo "building llama.cpp with CUDA (archs $CUDA_ARCHS, $JOBS jobs, $CUDACXX); log: $WORK/build.log"
    touch "$WORK/build.started"
    # setsid + nohup: the build outlives this command (one command may run 10 minutes);
    # its exit status lands in build.rc, whatever pid setsid ends up with.
    setsid nohup bash -c "
      cmake -S '$LLAMA_CPP' -B '$BUILD' -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES='$CUDA_ARCHS' -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF &&
      cmake --build '$BUILD' -j '$JOBS' --target llama llama-server
      echo \$? >'$WORK/build.rc.tmp' && mv '$WORK/build.rc.tmp' '$WORK/build.rc'
    " >"$WORK/build.log" 2>&1 </dev/null &
  fi
  local waited=0
  while [ ! -f "$WORK/build.rc" ]; do
    if [ "$waited" -ge "$WAIT_S" ]; then
      tail -n 3 "$WORK/build.log"
      echo "still building after ${WAIT_S} s: run build again"
      return 0
    fi
    sleep 10
    waited=$((waited + 10))
  done
  built || { tail -n 40 "$WORK/build.log"; die "the build failed (log above)"; }
  ls -la "$BUILD/bin"
  echo "built in $WORK"
}

python_env() {
  # Pure-Python llama-cpp-python on the CUDA libraries; the carried wheels unpacked into
  # a folder on PYTHONPATH (no pip, no venv needed there).
  local site=$WORK/site
  if [ ! -f "$site/.done" ]; then
    mkdir -p "$site"
    python3 - "$CARRY/wheels" "$site" <<'PY'
import pathlib, re, sys, zipfile
wheels, site = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
here = "cp%d%d" % sys.version_info[:2]
for wheel in sorted(wheels.glob("*.whl")):
    tags = re.findall(r"-(cp\d+)-", wheel.name)
    if tags and tags[0] != here and "abi3" not in wheel.name:
        sys.exit(f"{wheel.name} is for {tags[0]}, this python3 is {here}: "
                 f"run PY_VERSION={sys.version_info[0]}.{sys.version_info[1]} benchmarks/gpu/prepare.sh")
    zipfile.ZipFile(wheel).extractall(site)
PY
    touch "$site/.done"
  fi
  export PYTHONPATH=$site:$SRC:$REPO${PYTHONPATH:+:$PYTHONPATH}
  export LLAMA_CPP_LIB_PATH=$BUILD/bin
}

check() {
  unpack
  python_env
  for f in "$REPO"/benchmarks/gpu/*.sh; do bash -n "$f"; done
  python3 -c 'import sys; print("python", sys.version.split()[0])'
  python3 -c 'import numpy, msgspec, zmq, psutil, yaml, jinja2, starlette, uvicorn, httpx, gguf, rich, diskcache, prometheus_client, pynvml; print("imports ok")'
  if built; then
    python3 -c 'import llama_cpp; print("llama.cpp GPU offload:", llama_cpp.llama_supports_gpu_offload())'
  else
    echo "not built yet"
  fi
}

bench() {
  built || die "not built yet: benchmarks/gpu/run.sh build"
  python_env
  python3 -c 'import llama_cpp, sys; ok = llama_cpp.llama_supports_gpu_offload(); print("GPU offload:", ok); sys.exit(0 if ok else 1)' ||
    die "llama.cpp was built without a GPU backend"
  mkdir -p "$OUT"
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
  [ -f "$MODEL" ] || python3 -m benchmarks.gpu.model --out "$MODEL"
  python3 -m benchmarks.gpu.run --model "$MODEL" --llama-server "$BUILD/bin/llama-server" --out "$OUT" "$@"
}

case "${1:-}" in
  build) build ;;
  bench) shift; bench "$@" ;;
  check) check ;;
  *) die "usage: $0 build | bench [benchmarks.gpu.run flags] | check" ;;
esac
