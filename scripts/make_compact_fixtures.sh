#!/usr/bin/env bash
# Regenerate the compact fixture set tests/data/{pidnet,sampler,gemma2,manifests} from upstream's code.
# Needs: a Python with torch (CPU) and transformers (TORCH_PYTHON), an upstream PiD checkout at commit 2c8814c
# (PID_REF), the shared fixture tools (FIX_TOOLS, default ../shared/fixtures/tools). FIX_SEED 9 differs from
# the shared set's seed so that the compact set is an independent check.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
: "${TORCH_PYTHON:=/work/torchenv/bin/python}"
: "${PID_REF:=$repo/../upstream}"
export PID_REF FIX_SEED="${FIX_SEED:-9}" FIX_GEMMA_L="${FIX_GEMMA_L:-24}"
out="$repo/tests/data"
tmp="$(mktemp -d "$repo/tests/.data-tmp-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
"$TORCH_PYTHON" "$repo/scripts/make_compact_fixtures.py" "$tmp"
for part in pidnet sampler gemma2 manifests; do
    rm -rf "${out:?}/$part"
    mv "$tmp/$part" "$out/$part"
done
