# Shared set-up for scripts/demo, scripts/test and the benchmark scripts; source it, do not run it.
# Installs what a fresh Debian machine lacks (Mosquitto, OpenSSL, curl, the
# Python venv module), then creates .venv and installs edge-agent into it.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${EDGE_AGENT_VENV:-$REPO_ROOT/.venv}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "error: '$*' needs root and sudo is not installed; run it as root" >&2
        return 1
    fi
}

# Packages of the software-TPM tests: a TPM simulator, the TSS tools, the
# OpenSSL provider for TPM-held keys, and a resource manager on a D-Bus bus.
TPM_TEST_PACKAGES=(swtpm swtpm-tools tpm2-tools tpm2-openssl tpm2-abrmd libtss2-tcti-tabrmd0 dbus)

# install_debian_packages [--tpm]: --tpm (scripts/test only) also installs
# TPM_TEST_PACKAGES. A failure there is a warning, not an error, because the
# TPM tests then skip and name what is missing.
install_debian_packages() {
    if [ "${1:-}" = "--tpm" ]; then
        install_tpm_test_packages || echo "warning: TPM test packages not installed; the TPM tests will skip" >&2
    fi
    local wanted=()
    [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || wanted+=(mosquitto)
    command -v openssl >/dev/null 2>&1 || wanted+=(openssl)
    command -v curl >/dev/null 2>&1 || wanted+=(curl)
    command -v python3 >/dev/null 2>&1 || wanted+=(python3)
    if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        wanted+=(python3-venv)
    fi
    if [ "${#wanted[@]}" -eq 0 ]; then
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: missing ${wanted[*]} and apt-get is not available; install them with your package manager" >&2
        return 1
    fi
    echo "installing Debian packages: ${wanted[*]}" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
    # The Debian package may start a system broker on port 1883; the demo and
    # the tests use their own instances on free loopback ports.
}

install_tpm_test_packages() {
    local wanted=() package
    for package in "${TPM_TEST_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
            wanted+=("$package")
        fi
    done
    if [ "${#wanted[@]}" -eq 0 ]; then
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || return 1
    echo "installing Debian packages for the TPM tests: ${wanted[*]}" >&2
    as_root apt-get update -qq || return 1
    # tpm2-abrmd's package may start a system daemon; the tests run their own on a private bus.
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
}

create_venv() {
    local extras="$1"
    local stamp="$VENV/.edge-agent-install"
    local wanted
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    # The install is editable, so code changes need no reinstall; only a change
    # of pyproject.toml or of the requested extras does.
    wanted="$(sha256sum "$REPO_ROOT/pyproject.toml" | cut -d' ' -f1) $extras"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
        return 0
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO_ROOT$extras"
    echo "$wanted" > "$stamp"
}
