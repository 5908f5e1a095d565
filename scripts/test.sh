#!/usr/bin/env bash
# scripts/test.sh - THE test command: install what the tests need, then run them.
#
#   sudo bash scripts/test.sh [CARGO TEST ARGS…]   e.g. bash scripts/test.sh -- --nocapture
#   sudo bash scripts/test.sh --deps-only          install the system packages only (CI, demo)
#
# The integration tests start real OpenSSH sshd and vsftpd servers on 127.0.0.x, create a
# throwaway user and add nft rules, so they run as root. Missing Debian packages are installed
# with apt-get (non-interactive; waits for a held dpkg lock, retries once). Works with no stdin.
set -euo pipefail

cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential               # cc and make for the bundled C (libssh2, SQLite); dpkg-dev
  openssh-server openssh-client # sshd "hosts", ssh/ssh-keygen/ssh-agent
  vsftpd openssl                # FTP(S) "hosts", their certificate
  nftables iproute2             # blocking a host (timeouts), ss
  subversion git                # hook tests: real svnadmin/svnlook, git
  libssl-dev pkg-config         # building ssh2 (openssl-sys)
  curl sqlite3 inotify-tools time
  chromium chromium-driver      # the status page in a real headless browser
  python3-prometheus-client     # /metrics read by a real OpenMetrics parser (/usr/bin/python3)
  nginx                         # the rolling-update runbook: a real load balancer in front of two hosts
  ca-certificates               # cargo fetching crates on a bare machine
)

# shellcheck source=scripts/apt.sh
. scripts/apt.sh

log() { echo "test.sh: $*" >&2; }

missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
  done
}

# no service started or left enabled (vsftpd would listen on port 21): scripts/apt.sh
apt_install() {
  apt_install_quietly --with-recommends "$@"
}

install_deps() {
  local missing
  missing=$(missing_packages | tr '\n' ' ')
  if [ -z "${missing// /}" ]; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    log "missing packages: $missing; run as root (or: apt-get install $missing)"
    exit 1
  fi
  log "installing: $missing"
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086 # word splitting of the package list is intended
  if ! apt_install $missing </dev/null; then
    log "apt-get failed; retrying once in 10 s"
    sleep 10
    # shellcheck disable=SC2086
    apt_install $missing </dev/null
  fi
}

if [ "${1:-}" = --deps-only ]; then
  install_deps
  exit 0
fi

# shellcheck source=scripts/toolchain.sh
. scripts/toolchain.sh
need_cargo

if [ "$(id -u)" != 0 ]; then
  log "the integration tests start sshd/vsftpd, add a user and nft rules: run as root"
  exit 1
fi
install_deps
exec cargo test --all-targets "$@"
