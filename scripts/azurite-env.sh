#!/usr/bin/env bash
# Azurite, Microsoft's Azure Storage emulator (npm package `azurite`, pinned with its lockfile in
# tests/azurite), for the az:// tests in tests/object_store.rs. Needs Node.js and npm (Debian's
# packages if they are missing). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../tests/azurite"
want=$(node -p "require('./package.json').dependencies.azurite" 2>/dev/null || true)
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q nodejs npm >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q nodejs npm >/dev/null; }
  want=$(node -p "require('./package.json').dependencies.azurite")
fi
have=$(node -p "require('./node_modules/azurite/package.json').version" 2>/dev/null || true)
if [ "$have" != "$want" ] || [ ! -x node_modules/.bin/azurite-blob ]; then
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
fi
echo "azurite $(node -p "require('./node_modules/azurite/package.json').version") (node $(node --version))"
