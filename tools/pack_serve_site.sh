#!/usr/bin/env bash
# Makes .whl_serve/site_serve.tar.xz, the serve extra for the GPU machine (x86-64, CPython 3.12, no internet), used
# by tools/gpu_issue17.sh. The device lacks nvidia-pytriton, tritonclient and some of their dependencies (and, on
# some images, click/jsonschema/imageio/tqdm); protobuf and grpcio are carried because tritonclient 2.73's generated
# code needs protobuf >= 6.33.5 and grpcio >= 1.81.1. nvidia-pytriton's wheel alone is 55 MB and the tracked tree
# ~16 MiB, over the 64 MiB a device call may carry; so the wheels are unpacked here as `pip install --target` does
# (--no-deps, for cp312 manylinux x86-64) and the folder xz-compressed (~40 MB). The device unpacks it and checks
# every file against the wheels' RECORD sha256. numpy is not carried: pytriton 0.7 declares numpy<2 but is used with
# the device's numpy 2 (tools/gpu_issue17.sh imports everything before starting a server).
#   bash tools/pack_serve_site.sh            # in the repo root; ~10 minutes (xz -9 on 2 cores)
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
# shellcheck disable=SC2086
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  --target "$STAGE/site" $PKGS
mkdir -p .whl_serve
tar -C "$STAGE" -cf - site | xz -T2 -9 > .whl_serve/site_serve.tar.xz.part
mv .whl_serve/site_serve.tar.xz.part .whl_serve/site_serve.tar.xz
ls -l .whl_serve/site_serve.tar.xz
