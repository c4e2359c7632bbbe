#!/usr/bin/env bash
# Pack what the GPU run needs into .gpu-carry/ (git-ignored, under the 64 MiB a device run
# carries), on a machine that reaches the package registry. The GPU machine reaches none:
#   - llama-cpp-python's sdist, without what the build does not need (~12 of 77 MB);
#   - wheels of every Python package the pool, the benchmark and the model writer import,
#     at the versions .venv runs, for this Python (PY_VERSION=3.12 for another one there).
# Then, in the session lent a GPU: run(carry=[".gpu-carry"], "benchmarks/gpu/run.sh build"),
# and "benchmarks/gpu/run.sh bench" (see the README, "On a GPU").
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CARRY=${CARRY:-.gpu-carry}
VERSION=$(sed -n 's/^LLAMA_CPP_VERSION := //p' Makefile)
PY_VERSION=${PY_VERSION:-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
# Imported by llamapool (pyproject's dependencies but llama-cpp-python), by llama_cpp,
# by the benchmark client and by the model writer; nvidia-ml-py for the VRAM readings.
PACKAGES="starlette uvicorn uvloop httptools pyzmq psutil PyYAML Jinja2 MarkupSafe msgspec
  prometheus_client httpx anyio numpy diskcache typing_extensions gguf rich"

rm -rf "$CARRY"
mkdir -p "$CARRY/wheels"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp"
tar xzf "$tmp/llama_cpp_python-$VERSION.tar.gz" -C "$tmp"
src="$tmp/llama_cpp_python-$VERSION"
lc="$src/vendor/llama.cpp"
rm -rf "$src/.git" "$src/docs" "$src/examples" "$src/tests" "$lc/.git" "$lc/docs" "$lc/benches" \
  "$lc/media" "$lc/.devops" "$lc/gguf-py" "$lc/tools/ui/tests" "$lc/examples/model-conversion"
rm -f "$lc"/models/*.gguf*
tar czf "$CARRY/llama_cpp_python-$VERSION.tar.gz" -C "$tmp" "llama_cpp_python-$VERSION"

pins=()
for name in $PACKAGES; do
  pin=$("$PY" -m pip freeze 2>/dev/null | grep -i "^${name//_/[-_]}==" || true)
  pins+=("${pin:-$name}")
done
"$PY" -m pip download -q --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform linux_x86_64 -d "$CARRY/wheels" \
  "${pins[@]}" nvidia-ml-py
echo "$PY_VERSION" > "$CARRY/python-version"
du -sh "$CARRY" "$CARRY"/*
