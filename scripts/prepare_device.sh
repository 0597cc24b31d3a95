#!/usr/bin/env bash
# Lays out what scripts/device_check.sh needs, in folders git ignores: the loguru wheel (.whl), the
# fixtures it checks (.fx) and an upstream checkout (ref, never committed).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info && touch .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || printf '/.whl/\n/.fx/\n' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .whl loguru
mkdir -p .fx && for v in v1_flux v1pt5_flux2; do mkdir -p .fx/$v && cp ../shared/fixtures/pidnet/$v/* .fx/$v/; done
cp ../shared/fixtures/sampler/v1_flux_4step.npz .fx/
[ -d ref/pid ] || { echo "put an upstream nv-tlabs/PiD checkout at ./ref (git ignores it)"; exit 1; }
du -sh .whl .fx ref
