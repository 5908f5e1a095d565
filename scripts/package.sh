#!/usr/bin/env bash
# scripts/package.sh - build the Debian package: target/debian/dispatch_VERSION_ARCH.deb
#
#   bash scripts/package.sh            build it (prints the .deb's path on the last line)
#
# Builds the release binary, makes the man pages and shell completions from it
# (`dispatch man DIR`, `dispatch completions SHELL`) into target/assets/, then
# packs with cargo-deb (`cargo deb --no-build`; metadata in Cargo.toml
# [package.metadata.deb], maintainer scripts in contrib/debian/). cargo-deb is
# installed with `cargo install cargo-deb --locked` if missing (about 2 minutes).
# Needs cargo (rustup, Rust >= 1.88), build-essential, pkg-config, libssl-dev
# and dpkg-dev: `bash scripts/test.sh --deps-only` installs the system packages.
set -euo pipefail

cd "$(dirname "$0")/.."

log() { echo "package.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# shellcheck source=scripts/toolchain.sh
. scripts/toolchain.sh
need_cargo

if ! cargo deb --version >/dev/null 2>&1; then
  log "cargo-deb missing: cargo install cargo-deb --locked"
  cargo install cargo-deb --locked
fi
command -v dpkg-shlibdeps >/dev/null 2>&1 || die "dpkg-shlibdeps missing: apt-get install dpkg-dev"

log "cargo build --release"
cargo build --release --locked
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET/release/dispatch"
[ -x "$BIN" ] || die "no binary at $BIN"

# the asset paths in Cargo.toml are under target/: with another CARGO_TARGET_DIR
# the binary is copied there
if [ "$TARGET" != target ]; then
  mkdir -p target/release
  cp "$BIN" target/release/dispatch
fi

ASSETS=target/assets
rm -rf "$ASSETS"
mkdir -p "$ASSETS/man" "$ASSETS/completions"
"$BIN" man "$ASSETS/man"
gzip -9n "$ASSETS"/man/*.1
"$BIN" completions bash >"$ASSETS/completions/dispatch.bash"
"$BIN" completions zsh >"$ASSETS/completions/_dispatch"
"$BIN" completions fish >"$ASSETS/completions/dispatch.fish"

log "cargo deb --no-build"
DEB=$(cargo deb --no-build | tail -n 1)
[ -f "$DEB" ] || die "cargo deb made no package (got: $DEB)"
dpkg-deb --info "$DEB" >/dev/null
echo "$DEB"
