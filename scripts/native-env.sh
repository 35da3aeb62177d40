#!/usr/bin/env bash
# Native build tools for the fast path: nasm, without which mozjpeg-sys builds libjpeg-turbo's
# decoder with no SIMD (JPEG decode ~1.5-2x slower; recap then runs at ~2.6x img2dataset's
# images/s on photo-like JPEGs instead of ~4x). Installed from Debian's packages when it can be;
# otherwise a loud warning (the build still works, only slower). Idempotent; run before cargo.
set -uo pipefail
if command -v nasm >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get install -y -q nasm >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q nasm >/dev/null 2>&1; }
fi
if ! command -v nasm >/dev/null 2>&1; then
  cat >&2 <<'MSG'
************************************************************************************************
* WARNING: nasm is not installed and could not be installed (apt-get install nasm).             *
* libjpeg-turbo (mozjpeg-sys) will be built WITHOUT SIMD: JPEG decoding is ~2x slower.          *
* Install nasm (Debian/Ubuntu: apt-get install nasm; macOS: brew install nasm), then rebuild:   *
*   cargo clean -p mozjpeg-sys && cargo build --release                                          *
* `recap --version` says whether the binary you run has SIMD JPEG.                              *
************************************************************************************************
MSG
  exit 0
fi
echo "installed $(nasm -v)"
