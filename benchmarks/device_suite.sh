#!/usr/bin/env bash
# The device suite (benchmarks/device_suite.py): every GPU measurement in one command, or its CPU dry run.
#   bash benchmarks/device_suite.sh [--out DIR] [--wheels DIR] [--only PART,...] [--dry-run]
# Runs under the python3 on PATH (or $PYTHON): on a GPU image, the one that holds torch.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/device_suite.py "$@"
