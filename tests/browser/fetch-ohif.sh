#!/usr/bin/env bash
# Unpack the prebuilt OHIF Viewer (npm package @ohif/app, its dist/) into ./ohif/package/.
# Only the build is used: the package's own dependency list names versions the registry
# does not have, so `npm install @ohif/app` fails; `npm pack` fetches the tarball alone and
# checks it against the registry's integrity hash.
set -euo pipefail
cd "$(dirname "$0")"
VERSION=3.13.2
if [ -f ohif/package/dist/index.html ] && grep -q "\"version\": \"$VERSION\"" ohif/package/package.json; then
  exit 0
fi
rm -rf ohif && mkdir ohif
tarball=$(cd ohif && npm pack --silent "@ohif/app@$VERSION")
tar -xzf "ohif/$tarball" -C ohif
rm "ohif/$tarball"
echo "OHIF Viewer $VERSION unpacked in $(pwd)/ohif/package/dist"
