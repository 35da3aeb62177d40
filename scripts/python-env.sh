#!/usr/bin/env bash
# A Python virtualenv (.venv) with the packages the interop tests use: pyarrow, DuckDB, polars and
# Hugging Face `datasets` (with Pillow, to decode the Image feature) open the shards recap writes
# (numpy for the reinforced columns); `webdataset` reads `recap export webdataset`;
# `kubernetes-validate` checks deploy/k8s against the Kubernetes schemas (offline); moto's S3
# server (`moto[server]`) is the object store the tests write to; the Azure SDK for Python
# (`azure-storage-blob`) makes the Azurite container and lists the blocks a run left uncommitted.
# Idempotent; pinned so a PyPI release cannot change a test run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import pyarrow, duckdb, numpy, polars, datasets, PIL, webdataset, kubernetes_validate, moto, flask, azure.storage.blob' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "pyarrow==${PYARROW_VERSION:-26.0.1}" "duckdb==${DUCKDB_VERSION:-1.5.6}" \
    "numpy==${NUMPY_VERSION:-2.4.6}" "polars==${POLARS_VERSION:-2.1.0}" "datasets==${DATASETS_VERSION:-5.2.0}" "pillow==${PILLOW_VERSION:-12.0.0}" "webdataset==${WEBDATASET_VERSION:-1.0.2}" \
    "kubernetes-validate==${KUBERNETES_VALIDATE_VERSION:-1.37.0}" "moto[server]==${MOTO_VERSION:-5.2.5}" \
    "azure-storage-blob==${AZURE_STORAGE_BLOB_VERSION:-12.31.1}"
fi
.venv/bin/python -c 'import pyarrow, duckdb, polars, datasets; print(f"python env: pyarrow {pyarrow.__version__}, duckdb {duckdb.__version__}, polars {polars.__version__}, datasets {datasets.__version__}")'
