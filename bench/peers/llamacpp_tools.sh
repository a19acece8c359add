#!/usr/bin/env bash
# Build llama.cpp's own quantization tools (llama-quantize, llama-imatrix, llama-perplexity) as a
# benchmark peer, from the llama.cpp sources vendored in the llama-cpp-python sdist kompakt pins, so
# the peer is exactly the llama.cpp kompakt's own GGUF path runs, built offline.
#
#   bench/peers/llamacpp_tools.sh [SDIST.tar.gz]
#
# SDIST defaults to $LLAMACPP_SDIST, then to llama_cpp_python-<version>.tar.gz in the install folder
# (fetched once with `pip download --no-binary` when online). The tools land in
# ~/.cache/kompakt/peers/llamacpp-<version>/bin; a second run finds them and does nothing.
# CPU flags are the Makefile's for the llama-cpp-python wheel (x86-64-v3, no AMX / AVX-512), so
# the peer and kompakt's llama.cpp use the same kernels. Two jobs, three targets: ≈ 4-5 min on 2 cores.
set -euo pipefail

VERSION=0.3.36
PREFIX="${KOMPAKT_PEERS:-$HOME/.cache/kompakt/peers}/llamacpp-$VERSION"
TOOLS=(llama-quantize llama-imatrix llama-perplexity)

built() {
    for tool in "${TOOLS[@]}"; do [ -x "$PREFIX/bin/$tool" ] || return 1; done
}
if built; then
    echo "llama.cpp tools already built in $PREFIX/bin"
    exit 0
fi

mkdir -p "$PREFIX"
SDIST="${1:-${LLAMACPP_SDIST:-$PREFIX/llama_cpp_python-$VERSION.tar.gz}}"
if [ ! -f "$SDIST" ]; then
    python3 -m pip download -q --no-deps --no-binary :all: -d "$PREFIX" \
        "llama-cpp-python==$VERSION" \
        || { echo "no sdist at $SDIST and pip could not fetch it: pass the sdist's path" >&2; exit 2; }
    SDIST="$PREFIX/llama_cpp_python-$VERSION.tar.gz"
fi

if [ "$(uname -m)" = x86_64 ]; then
    CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
else
    CPU_FLAGS=()
fi

# Everything happens in a scratch folder beside the result and is renamed into place at the end,
# so an interrupted build never leaves half a peer that `built` would accept.
WORK="$(mktemp -d "$PREFIX/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
tar -xzf "$SDIST" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
# Static libraries: the binaries then carry their own ggml and never pick up the venv's libggml.
cmake -S "$SRC" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF "${CPU_FLAGS[@]}" >"$WORK/cmake.log" \
    || { tail -20 "$WORK/cmake.log" >&2; exit 1; }
cmake --build "$WORK/build" -j 2 --target "${TOOLS[@]}"
mkdir -p "$WORK/bin"
for tool in "${TOOLS[@]}"; do cp "$WORK/build/bin/$tool" "$WORK/bin/"; done
rm -rf "$PREFIX/bin"
mv "$WORK/bin" "$PREFIX/bin"
echo "llama.cpp $VERSION tools built in $PREFIX/bin: ${TOOLS[*]}"
