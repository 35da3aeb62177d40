#!/usr/bin/env bash
# A Python virtualenv (.venv) with the packages the interop tests use: pyarrow and DuckDB open
# the shards recap writes (numpy for the reinforced columns). Idempotent; pinned so a PyPI release cannot change a test run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import pyarrow, duckdb, numpy' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "pyarrow==${PYARROW_VERSION:-26.0.1}" "duckdb==${DUCKDB_VERSION:-1.5.6}" "numpy==${NUMPY_VERSION:-2.4.6}"
fi
.venv/bin/python -c 'import pyarrow, duckdb; print(f"python env: pyarrow {pyarrow.__version__}, duckdb {duckdb.__version__}")'
