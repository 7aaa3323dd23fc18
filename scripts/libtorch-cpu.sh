#!/usr/bin/env bash
# Assemble a CPU-only libtorch 2.11.0 (what tch 0.24 expects) from PyPI wheels, for building
# gpuwarden with `--features torch` on a machine without a GPU.
#
# Why not the official libtorch zip: its host is not reachable from every build machine, and PyPI
# has no CPU-only torch for Linux x86_64. The PyPI wheel is CUDA-linked, but its libtorch_cpu.so
# needs only two small CUDA libraries (libcudart, libcupti, 13 MB of wheels) to load; the 2 GB of
# other NVIDIA wheels behind it are needed only by libtorch_cuda.so, which this directory leaves
# out. A stub libtorch.so stands in for the real one (which would pull libtorch_cuda.so in):
# tch links `-ltorch`, but every symbol it uses lives in libtorch_cpu.so and libc10.so.
#
# Usage: scripts/libtorch-cpu.sh DIR
#   Fills DIR with include/ and lib/, then prints the environment to export (eval-able).
#   Running it again on a complete DIR downloads nothing and prints the same lines.
#   Needs python3 with pip, and gcc (for the stub). About 530 MB is downloaded once; DIR ends at
#   about 520 MB (the wheels are deleted after extraction).
set -euo pipefail

TORCH_VERSION=2.11.0
# Pinned by hash: the torch wheel is the cp311 build (libtorch inside is the same for every
# Python version; pinning the tag makes the download independent of the local Python), and the
# two CUDA wheels are the versions torch 2.11.0 requires through cuda-toolkit==13.0.2.
REQUIREMENTS="\
torch==${TORCH_VERSION} --hash=sha256:7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-cupti==13.0.85 --hash=sha256:4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8
"

if [ $# -ne 1 ]; then
    echo "usage: $0 DIR   (DIR receives include/ and lib/ of a CPU libtorch ${TORCH_VERSION})" >&2
    exit 2
fi

mkdir -p "$1"
DIR=$(cd "$1" && pwd)
MARKER="$DIR/.libtorch-cpu-complete"

print_env() {
    cat <<EOF
export LIBTORCH="$DIR"
export LIBTORCH_CXX11_ABI=1
export LD_LIBRARY_PATH="$DIR/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
}

# The marker is written last, so a run that was interrupted anywhere starts over.
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$TORCH_VERSION" ]; then
    echo "libtorch-cpu: $DIR already holds libtorch $TORCH_VERSION" >&2
    print_env
    exit 0
fi

for tool in python3 gcc; do
    if ! command -v "$tool" >/dev/null; then
        echo "libtorch-cpu: $tool is needed; install it (apt-get install python3-pip gcc)" >&2
        exit 1
    fi
done

# Starting over deletes DIR's include/ and lib/, so only in a directory this script made: a
# mistyped DIR such as /usr/local must not lose its libraries.
PARTIAL="$DIR/.libtorch-cpu-partial"
if [ -n "$(ls -A "$DIR")" ] && [ ! -f "$PARTIAL" ] && [ ! -f "$MARKER" ]; then
    echo "libtorch-cpu: $DIR is not empty and was not made by this script; give a new or empty directory" >&2
    exit 1
fi
touch "$PARTIAL"
rm -rf "$DIR/include" "$DIR/lib" "$DIR/wheels" "$DIR/build-version" "$MARKER"
mkdir -p "$DIR/wheels" "$DIR/lib"

echo "libtorch-cpu: downloading torch $TORCH_VERSION and the CUDA runtime wheels (~530 MB)" >&2
printf '%s' "$REQUIREMENTS" >"$DIR/wheels/requirements.txt"
python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_25_x86_64 \
    --platform manylinux_2_17_x86_64 --python-version 3.11 --implementation cp \
    -r "$DIR/wheels/requirements.txt" -d "$DIR/wheels" >&2

echo "libtorch-cpu: extracting headers and libraries" >&2
python3 - "$DIR" <<'PY'
import glob, os, shutil, sys, zipfile

out = sys.argv[1]
wheels = os.path.join(out, "wheels")
wanted_libs = {
    "torch/lib/libtorch_cpu.so", "torch/lib/libc10.so", "torch/lib/libgomp.so.1",
    "nvidia/cu13/lib/libcudart.so.13", "nvidia/cu13/lib/libcupti.so.13",
}
found = set()
for path in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
    with zipfile.ZipFile(path) as whl:
        for info in whl.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            if name.startswith("torch/include/"):
                dest = os.path.join(out, name[len("torch/"):])
            elif name in wanted_libs:
                dest = os.path.join(out, "lib", os.path.basename(name))
                found.add(name)
            else:
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with whl.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst)
missing = wanted_libs - found
if missing:
    sys.exit(f"libtorch-cpu: the wheels lack {sorted(missing)}; were they changed?")
PY

# tch's build script links `-ltorch`; this empty library satisfies it without libtorch_cuda.so.
# With rustc's default --as-needed it does not even end up in the binary's NEEDED list.
echo "" | gcc -shared -fPIC -x c - -Wl,-soname,libtorch.so -o "$DIR/lib/libtorch.so"
# torch-sys checks this file against the version it was written for (2.11.0 for tch 0.24).
echo "$TORCH_VERSION" >"$DIR/build-version"

rm -rf "$DIR/wheels"
echo "$TORCH_VERSION" >"$MARKER"
rm -f "$PARTIAL"
echo "libtorch-cpu: done; export these before building with --features torch:" >&2
print_env
