# Sourced by the scripts in this folder: creates .venv (git-ignored) and installs the project into it.
# Re-installs only when pyproject.toml changed, so repeated runs start in a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RELIABLE_MESSAGING_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

ensure_venv() {
  local python="${PYTHON:-python3}"
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found: Python >= 3.10 is required" >&2; exit 1
  fi
  if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "error: Python >= 3.10 is required, $python is $("$python" -V 2>&1)" >&2; exit 1
  fi
  if [ ! -x "$PY" ]; then
    "$python" -m venv "$VENV" || { echo "error: could not create a virtualenv at $VENV (Debian: apt-get install -y python3-venv)" >&2; exit 1; }
  fi
  local stamp="$VENV/.installed" want
  want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "installing reliable-messaging[test] into $VENV ..." >&2
    "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >&2
    "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" >&2 \
      || { echo "error: pip could not install the project's dependencies (see above)" >&2; exit 1; }
    echo "$want" > "$stamp"
  fi
}

# Start the local brokers the tests need unless the environment already points at brokers.
# Prints nothing on success; exports KAFKA_BOOTSTRAP_SERVERS etc. into the caller's shell.
ensure_brokers() {
  local wanted=("$@") missing=()
  for target in "${wanted[@]}"; do
    case "$target" in
      kafka) [ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ] || missing+=(kafka) ;;
      kafka-cluster) [ -n "${KAFKA_CLUSTER_BOOTSTRAP_SERVERS:-}" ] || missing+=(kafka-cluster) ;;
      rabbitmq) [ -n "${RABBITMQ_URL:-}" ] || missing+=(rabbitmq) ;;
      redis) [ -n "${REDIS_URL:-}" ] || missing+=(redis) ;;
    esac
  done
  if [ ${#missing[@]} -gt 0 ]; then
    local exports
    exports="$("$PY" -m reliable_messaging.testing.brokers up "${missing[@]}")" || exit 1
    eval "$exports"
  fi
}
