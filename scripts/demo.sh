#!/usr/bin/env bash
# scripts/demo.sh - the quick start: run dispatch for real, against a throwaway "host".
#
#   sudo bash scripts/demo.sh
#
# On a Debian box, as root: installs what it runs if missing (openssh-server and -client, the
# build tools; never enabling or starting a system service: see install_demo_deps), builds
# dispatch (release), starts a throwaway OpenSSH sshd on 127.0.0.2 (a free port, its own host key,
# client key and known_hosts, a throwaway user `dispatch-demo`), writes a config routing
# web-*.tar.gz and api-*.tar.gz, builds two sample tarballs and runs
#
#   target/release/dispatch -c $TMP/dispatch.ini $TMP/pkgs/*
#
# then shows what landed on the "host". Everything it made (sshd, user, temp dir) is removed on
# exit. Exit status: dispatch's.
set -euo pipefail

cd "$(dirname "$0")/.."

ADDR=127.0.0.2
DEMO_USER=dispatch-demo

say() { printf '\n==> %s\n' "$*"; }
die() { echo "demo.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it starts sshd and adds a throwaway user"

# shellcheck source=scripts/toolchain.sh
. scripts/toolchain.sh
need_cargo

# What the demo runs, and nothing else (the test servers are scripts/test.sh's business).
DEMO_PACKAGES=(openssh-server openssh-client build-essential pkg-config libssl-dev iproute2 ca-certificates)

# shellcheck source=scripts/apt.sh
. scripts/apt.sh

# Install the missing ones, starting and enabling no service (see scripts/apt.sh).
install_demo_deps() {
  local missing=() p
  for p in "${DEMO_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  echo "installing: ${missing[*]}"
  apt_install_quietly "${missing[@]}" || die "apt-get install failed"
}

say "system packages the demo runs"
install_demo_deps

say "cargo build --release"
cargo build --release
BIN="${CARGO_TARGET_DIR:-target}/release/dispatch"
[ -x "$BIN" ] || die "no binary at $BIN"

TMP=$(mktemp -d /tmp/dispatch-demo.XXXXXX)
chmod 755 "$TMP" # the demo user must reach its home inside
SSHD_PID=
USER_MADE=0
cleanup() {
  local rc=$?
  if [ -n "$SSHD_PID" ]; then
    kill "$SSHD_PID" 2>/dev/null || true
    wait "$SSHD_PID" 2>/dev/null || true
  fi
  if [ "$USER_MADE" = 1 ]; then
    userdel -f "$DEMO_USER" 2>/dev/null || true
  fi
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT

say "throwaway user $DEMO_USER, sshd on $ADDR"
DEMO_HOME="$TMP/home/$DEMO_USER"
mkdir -p "$DEMO_HOME"
chmod 755 "$TMP/home"
if id "$DEMO_USER" >/dev/null 2>&1; then
  # only a leftover of an earlier demo (home under /tmp/dispatch-demo.*) is reused
  case "$(getent passwd "$DEMO_USER" | cut -d: -f6)" in
    /tmp/dispatch-demo.*) usermod -d "$DEMO_HOME" "$DEMO_USER" ;;
    *) die "user $DEMO_USER exists and is not a leftover of this demo; not touching it" ;;
  esac
else
  useradd -M -U -d "$DEMO_HOME" -s /bin/bash "$DEMO_USER"
fi
USER_MADE=1
usermod -p '*' "$DEMO_USER" # not locked (sshd with UsePAM no refuses locked accounts), no password
chown "$DEMO_USER:" "$DEMO_HOME"

# a free port on $ADDR
PORT=
for p in $(seq 2222 2399); do
  if ! ss -Hltn "sport = :$p" | grep -q .; then PORT=$p; break; fi
done
[ -n "$PORT" ] || die "no free port in 2222-2399"

ssh-keygen -q -t ed25519 -N '' -C dispatch-demo-host -f "$TMP/ssh_host_ed25519_key"
ssh-keygen -q -t ed25519 -N '' -C dispatch-demo-client -f "$TMP/client_ed25519"
mkdir -p "$TMP/authorized_keys"
cp "$TMP/client_ed25519.pub" "$TMP/authorized_keys/$DEMO_USER"
echo "[$ADDR]:$PORT $(cut -d' ' -f1,2 "$TMP/ssh_host_ed25519_key.pub")" >"$TMP/known_hosts"

cat >"$TMP/sshd_config" <<EOF
Port $PORT
ListenAddress $ADDR
HostKey $TMP/ssh_host_ed25519_key
PidFile $TMP/sshd.pid
AuthorizedKeysFile $TMP/authorized_keys/%u
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin no
UseDNS no
PrintMotd no
MaxStartups 200:30:400
MaxSessions 100
LogLevel VERBOSE
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$TMP/sshd_config" 2>"$TMP/sshd.log" &
SSHD_PID=$!

banner() { timeout 1 bash -c "exec 3<>/dev/tcp/$ADDR/$PORT && head -c 4 <&3" 2>/dev/null || true; }
for _ in $(seq 100); do
  [ "$(banner)" = SSH- ] && break
  kill -0 "$SSHD_PID" 2>/dev/null || { cat "$TMP/sshd.log" >&2; die "sshd exited"; }
  sleep 0.1
done
[ "$(banner)" = SSH- ] || { cat "$TMP/sshd.log" >&2; die "sshd on $ADDR:$PORT did not answer"; }
echo "sshd pid $SSHD_PID on $ADDR:$PORT"

say "config $TMP/dispatch.ini"
cat >"$TMP/dispatch.ini" <<EOF
[dispatch]
state_dir = $TMP/state

[(?P<app>web|api)-(?P<version>[0-9.]+)\.tar\.gz\$]
host = $ADDR
port = $PORT
login = $DEMO_USER
identity_file = $TMP/client_ed25519
known_hosts = $TMP/known_hosts
dest_dir = ~/newcx/%Y%m%d_%H%M%S
install_command = tar xzf {name} && echo installed {app} {version} > {app}.installed
EOF
cat "$TMP/dispatch.ini"

say "two packages"
mkdir -p "$TMP/src/web-1.2" "$TMP/src/api-3.4" "$TMP/pkgs"
echo '<h1>web 1.2</h1>' >"$TMP/src/web-1.2/index.html"
printf '#!/bin/sh\necho api 3.4\n' >"$TMP/src/api-3.4/run.sh"
tar czf "$TMP/pkgs/web-1.2.tar.gz" -C "$TMP/src" web-1.2
tar czf "$TMP/pkgs/api-3.4.tar.gz" -C "$TMP/src" api-3.4
ls -l "$TMP/pkgs"

say "$BIN -c $TMP/dispatch.ini $TMP/pkgs/*"
set +e
"$BIN" -c "$TMP/dispatch.ini" "$TMP"/pkgs/*
RC=$?
set -e
echo "dispatch exited with $RC"

say "on the host: files under ~$DEMO_USER"
(cd "$DEMO_HOME" && find . -mindepth 1 | sort)
say "install results"
found=0
for f in "$DEMO_HOME"/newcx/*/*.installed; do
  [ -e "$f" ] || continue
  found=1
  echo "${f#"$DEMO_HOME"/}: $(cat "$f")"
done
[ "$found" = 1 ] || echo "(none)"
if [ "$RC" != 0 ]; then
  say "sshd log (last 30 lines)"
  tail -n 30 "$TMP/sshd.log"
fi
exit "$RC"
