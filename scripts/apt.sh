# scripts/apt.sh - sourced by demo.sh and test.sh: install Debian packages without
# starting or enabling any service. apt would start and enable sshd, vsftpd (plain FTP on
# port 21!), cron… on a systemd host: a policy-rc.d refuses every start during the install,
# and a unit the install enabled is disabled again (by systemctl, or by removing its
# .wants link where there is no systemctl), so the machine runs no new service, now or
# after a reboot. Waits for a held dpkg lock; no stdin needed.

# apt_install_quietly [--with-recommends] PKG…
apt_install_quietly() {
  local policy=/usr/sbin/policy-rc.d saved= rc=0 enabled_before unit recommends=--no-install-recommends
  if [ "${1:-}" = --with-recommends ]; then
    recommends=--install-recommends
    shift
  fi
  if [ -e "$policy" ]; then
    saved=$(mktemp /tmp/policy-rc.d.XXXXXX)
    cp -p "$policy" "$saved"
  fi
  printf '#!/bin/sh\n# dispatch scripts/apt.sh: no service starts while it installs packages\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  enabled_before=$(find /etc/systemd/system -path '*.wants/*' -printf '%f\n' 2>/dev/null | sort -u)
  DEBIAN_FRONTEND=noninteractive apt-get update -q -o DPkg::Lock::Timeout=300 </dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$recommends" \
      -o DPkg::Lock::Timeout=300 "$@" </dev/null || rc=$?
  if [ -n "$saved" ]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
  for unit in $(find /etc/systemd/system -path '*.wants/*' -printf '%f\n' 2>/dev/null | sort -u); do
    if ! grep -qxF "$unit" <<<"$enabled_before"; then
      echo "disabling $unit (enabled by the package install)"
      systemctl disable "$unit" >/dev/null 2>&1 ||
        find /etc/systemd/system -path "*.wants/$unit" -type l -delete
    fi
  done
  return "$rc"
}
