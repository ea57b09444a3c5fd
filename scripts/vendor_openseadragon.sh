#!/usr/bin/env bash
# Vendor the viewer's browser libraries from the npm registry into the package's static folder, so the page and
# /docs work offline (nothing is fetched at run time). The copied files are committed; rerun this script to update
# them (change the pinned versions below), then check the page (tests/views/test_deepzoom_browser.py).
#
#   scripts/vendor_openseadragon.sh            # needs npm and network access to the npm registry
#
# - openseadragon: build/openseadragon/openseadragon.min.js + LICENSE.txt (BSD-3-Clause). The page draws its own
#   zoom buttons, so OpenSeadragon's button images are not needed (showNavigationControl: false).
# - swagger-ui-dist: swagger-ui-bundle.js + swagger-ui.css + LICENSE (Apache-2.0), for FastAPI's /docs page.
set -euo pipefail

OPENSEADRAGON_VERSION=6.1.1
SWAGGER_UI_VERSION=5.36.0

root="$(cd "$(dirname "$0")/.." && pwd)"
static="$root/cytoretrieve/views/web/static/vendor"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

cd "$scratch"
npm pack --silent "openseadragon@$OPENSEADRAGON_VERSION" >/dev/null
npm pack --silent "swagger-ui-dist@$SWAGGER_UI_VERSION" >/dev/null
mkdir osd swagger
tar -xzf "openseadragon-$OPENSEADRAGON_VERSION.tgz" -C osd
tar -xzf "swagger-ui-dist-$SWAGGER_UI_VERSION.tgz" -C swagger

out="$static/openseadragon"
rm -rf "$out" && mkdir -p "$out"
cp osd/package/build/openseadragon/openseadragon.min.js "$out/"
cp osd/package/LICENSE.txt "$out/LICENSE.txt"
echo "openseadragon $OPENSEADRAGON_VERSION (npm), vendored by scripts/vendor_openseadragon.sh" > "$out/VERSION"

out="$static/swagger-ui"
rm -rf "$out" && mkdir -p "$out"
cp swagger/package/swagger-ui-bundle.js swagger/package/swagger-ui.css "$out/"
cp swagger/package/LICENSE "$out/LICENSE"
echo "swagger-ui-dist $SWAGGER_UI_VERSION (npm), vendored by scripts/vendor_openseadragon.sh" > "$out/VERSION"

ls -l "$static"/*
