#!/usr/bin/env bash
# Makes .whl_serve/site_serve.tar.xz and .whl_serve/site_stub.tar.xz, the serve extra for the GPU machine (x86-64,
# CPython 3.12, numpy 2, no internet), used by tools/gpu_issue17.sh.
#
# * site_serve: nvidia-pytriton, tritonclient and the dependencies the device lacks (and click/jsonschema/imageio/
#   tqdm, missing on some images); protobuf and grpcio because tritonclient 2.73's generated code needs protobuf >=
#   6.33.5 and grpcio >= 1.81.1. Unpacked as `pip install --target` does (--no-deps, cp312 manylinux x86-64) and
#   xz-compressed: nvidia-pytriton's wheel alone is 55 MB and the tracked tree ~16 MiB, over the 64 MiB a device call
#   carries. Trimmed of what Python 3.12 never loads: the Python-backend stubs for other Pythons and the libpython3.13
#   only the 3.13 stub links (listed in site/TRIMMED.txt; the device's RECORD check skips exactly those).
# * site_stub: numpy 1.26.4 for Triton's Python-backend stub only. PyTriton 0.7 bundles Triton 2.51, whose stub
#   mis-reads BYTES inputs under numpy 2 ("unpack_from requires a buffer of at least ... bytes"); the server process
#   keeps the device's numpy 2 (tools/gpu_issue17.sh puts site_stub on the path of isolated interpreters only, which
#   the stub is).
#   bash tools/pack_serve_site.sh            # in the repo root; ~10 minutes on 2 cores
set -euo pipefail
PKGS="nvidia-pytriton==0.7.0 tritonclient==2.73.0 pyzmq==27.3.0 sh==2.4.0 python-rapidjson==1.25
geventhttpclient==2.6.1 gevent==26.9.0 greenlet==3.3.2 zope.event==6.2 zope.interface==8.7 brotli==1.2.1
protobuf==6.33.6 grpcio==1.85.3 click==8.1.8 jsonschema==4.25.1 attrs==26.1.0 referencing==0.37.0 rpds-py==2026.9.1
jsonschema-specifications==2025.9.1 imageio==2.38.1 tqdm==4.70.1 importlib-metadata==10.2.0 zipp==4.1.2"
PLAT=""
for p in manylinux_2_35 manylinux_2_28 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  PLAT="$PLAT --platform ${p}_x86_64"
done
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
pip_target() {  # DIR PKG...
  local dir=$1; shift
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    --target "$dir" "$@"
}
# shellcheck disable=SC2086
pip_target "$STAGE/site" $PKGS
pip_target "$STAGE/stub" numpy==1.26.4
( cd "$STAGE/site" && { ls -d pytriton/tritonserver/python_backend_stubs/* | grep -v '/3\.12$';
                        ls nvidia_pytriton.libs/libpython3-*.13.so.*; } > TRIMMED.txt && xargs rm -rf < TRIMMED.txt )
mkdir -p .whl_serve
tar -C "$STAGE" -cf - site | xz -T1 -9 > .whl_serve/site_serve.tar.xz.part &
tar -C "$STAGE" -cf - stub | xz -T1 -9 > .whl_serve/site_stub.tar.xz.part
wait
mv .whl_serve/site_serve.tar.xz.part .whl_serve/site_serve.tar.xz
mv .whl_serve/site_stub.tar.xz.part .whl_serve/site_stub.tar.xz
ls -l .whl_serve/
