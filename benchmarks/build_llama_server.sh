#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server`, the peer benchmarks/serve.py measures `edgeai serve` against,
# from the llama.cpp sources inside llama-cpp-python's source distribution: the same pinned version
# (the Makefile's LLAMA_CPP) and the same flags the project builds llama-cpp-python with (GGML_NATIVE,
# AMX off on x86: see the Makefile), so the server and the library are the same llama.cpp.
# Outside the repository, in a cache folder; run by hand (never by tests or CI):
#
#     bash benchmarks/build_llama_server.sh [BUILD_DIR]     # default ~/.cache/edgeai-bench/llama-server-build
#
# The binary lands in BUILD_DIR/build/bin/llama-server (serve.py's default --llama-server).
# Built niced with at most JOBS (default 2) compile jobs. No web UI (never served to the benchmark,
# and providing it would download prebuilt assets), no curl, no OpenSSL (127.0.0.1 only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${1:-${EDGEAI_LLAMA_SERVER_DIR:-$HOME/.cache/edgeai-bench/llama-server-build}}
JOBS=${JOBS:-2}
PIN=$(sed -n 's/^LLAMA_CPP := //p' "$ROOT/Makefile")            # llama-cpp-python==X.Y.Z
VERSION=${PIN#*==}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3

mkdir -p "$DIR/src"
SDIST=$(ls "$DIR"/src/llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)
if [ -z "$SDIST" ]; then
  "$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DIR/src"
  SDIST="$DIR/src/llama_cpp_python-$VERSION.tar.gz"
fi
SRC="$DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || tar xzf "$SDIST" -C "$DIR/src"

FLAGS=()
case "$(uname -m)" in
  x86_64|amd64|AMD64|i686)
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    FLAGS+=("-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX") ;;
esac

nice -n 19 cmake -S "$SRC" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON "${FLAGS[@]}"
nice -n 19 cmake --build "$DIR/build" --config Release -j "$JOBS" --target llama-server
echo "$DIR/build/bin/llama-server"
"$DIR/build/bin/llama-server" --version 2>&1 | head -3 || true
