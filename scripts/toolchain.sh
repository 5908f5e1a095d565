# scripts/toolchain.sh - sourced by the scripts: is a Rust toolchain there, and new enough?
# (Debian 12's packaged rustc is 1.63; dispatch needs 1.88.)

MIN_RUST=1.88

need_cargo() {
  if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    cat >&2 <<MSG
$(basename "$0"): cargo not found. dispatch needs Rust >= $MIN_RUST (Debian 12's rustc is too old).
Install it with rustup, then run this again:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . "\$HOME/.cargo/env"
MSG
    exit 1
  fi
  local v
  v=$(rustc --version 2>/dev/null | awk '{print $2}')
  if [ -n "$v" ] && [ "$(printf '%s\n%s\n' "$MIN_RUST" "$v" | sort -V | head -n 1)" != "$MIN_RUST" ]; then
    echo "$(basename "$0"): rustc $v is older than $MIN_RUST: rustup update stable (or install with rustup)" >&2
    exit 1
  fi
}
