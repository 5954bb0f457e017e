#!/usr/bin/env bash
# tileseg entry points for a fresh machine with Python 3.11:
#   ./run.sh demo   - create .venv, install, segment the bundled mixed batch (embedded mode, no servers)
#   ./run.sh test   - create .venv, install with test and training extras, run ruff and the whole test suite
#   ./run.sh setup  - only create .venv and install
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

setup() {
  local extras=${1:-}
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  # Editable install: migrations and built-in models are read from the checkout.
  .venv/bin/python -m pip install --quiet -e ".${extras}"
}

case "${1:-demo}" in
  setup)
    setup "[test]"
    ;;
  demo)
    setup ""
    export TILESEG_DATA_DIR=${TILESEG_DATA_DIR:-$PWD/tileseg-data}
    .venv/bin/tileseg run samples/photos samples/geotiff samples/dicom "${@:2}"
    echo
    echo "Outputs are under $TILESEG_DATA_DIR/artifacts (paths above). Query again with: .venv/bin/tileseg results <job id>"
    ;;
  test)
    # The training extra too: the Model Garden (Mask R-CNN training and export) tests need it.
    setup "[test,train]"
    .venv/bin/ruff check .
    .venv/bin/python -m pytest "${@:2}"
    ;;
  *)
    echo "usage: $0 {demo|test|setup}" >&2
    exit 2
    ;;
esac
