#!/usr/bin/env bash
# The pure-Python wheels a GPU image with torch 2.11 / triton 3.6 and no diffusers lacks, downloaded into DIR for
#   bash benchmarks/device_suite.sh --wheels DIR
# Python 3.12 wheels, dependencies NOT resolved (--no-deps): the list is diffusers plus what such an image was found
# to lack of diffusers' own requirements (importlib_metadata); the suite installs them with --no-index --no-deps.
set -euo pipefail
dir="${1:?usage: bash benchmarks/device_wheels.sh DIR}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  "diffusers==${DIFFUSERS_VERSION:-0.42.1}" "importlib_metadata==${IMPORTLIB_METADATA_VERSION:-10.2.0}"
ls -1 "$dir"
