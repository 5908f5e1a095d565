#!/usr/bin/env bash
# bench/run.sh - dispatch against the tools operators use today, measured in the same run,
# on throwaway OpenSSH "hosts" on loopback (127.0.0.2-5, one sshd each, own port and user).
#
#   bench/run.sh [WORKLOAD...]      workloads: throughput many dropdir scale wan status bandwidth fanout
#                                   (default: the first four)
#
# Environment (defaults):
#   RUNS=3             repetitions per workload; medians are reported
#   SIZE_MB=1024       throughput: size of the random file (MiB)
#   NFILES=200 FILE_KB=100   many: number and size (KiB) of the packages, sent to 4 hosts
#   SCALE_FILES=100000 scale: files in the drop dir
#   WAN_FILES=200 WAN_RTTS="25 100"   wan: packages (FILE_KB each) to 4 hosts, each through a
#                      delaying TCP proxy (bench/delayproxy.py) with these round trips in ms; peers
#                      tar|ssh, scp+ssh and rsync over ssh per host (rsync installed if missing)
#   BW_MB=200 BW_HOSTS=8 BW_RATE=200mbit   bandwidth: one random package (MiB) to BW_HOSTS hosts, each
#                      in a network namespace (dspbenchN, veth, 10.231.77.0/24 in /30s) behind a tbf
#                      cap of BW_RATE towards the host (BW_BURST=256kb BW_LATENCY=50ms); the cap is
#                      checked by a raw TCP transfer of BW_PROBE_MB=50 per link, all at once
#   BW_INSTALL=wc      bandwidth: install command `wc -c NAME > NAME.installed` (the bench checks the
#                      sha256 afterwards, untimed); BW_INSTALL=sha256: `sha256sum NAME > NAME.installed`
#                      (on this shared box that hashes all hosts' copies on the client's 2 cores)
#   FANOUT_HOSTS=64 FANOUT_KB=10   fanout: one package to this many sshd on 127.0.1.1-N (one each)
#   FANOUT_RUNS=10     fanout: runs of dispatch; FANOUT_PEER_RUNS=$RUNS of them also run the peers
#   FANOUT_JOBS="8 64" fanout: dispatch `jobs` settings measured (the first one gives the ratios)
#   FANOUT_PEERS="pssh ansible"   fanout: peers (Debian pssh, ansible-core; installed if missing)
#   FANOUT_ANSIBLE_PERSIST=60s    fanout: Ansible's ControlPersist (its default); the masters are
#                      closed after each run, so every run starts without one
#   FANOUT_KEEP_DIR=/tmp/dsp-bench-fanout-kept.PID   fanout: where a run that lost hosts is kept
#   LEGACY_TIMEOUT=600 many: the legacy flood is cut off (and its leftovers counted failed) after this many s
#   LEGACY_RUNS=$RUNS  many: runs of the legacy flood (minutes each at full size; it loads the machine)
#   MANY_TOOLS="dispatch perhost mux"   many: the tools to run (legacy is added by LEGACY_RUNS)
#   LSYNCD_DELAYS="0 15"   dropdir: lsyncd `delay` settings to measure (15 is lsyncd's default)
#   DISPATCH_JOBS=8 DISPATCH_SESSIONS=2   dispatch's `jobs` and `max_sessions_per_host` (its defaults)
#   DISPATCH_BIN=      a dispatch binary to use; default: `cargo build --release` in the repo
#   DISPATCH_DESC=     how that binary was built (goes into the report)
#   BENCH_PORT=2422    sshd port (all hosts share it, on 127.0.0.2-5); 2222/2322 are used by others
#   BENCH_USER=dsp-bench   login created for the run (and deleted after, if this run created it)
#   RESULTS_DIR=bench/results   where <date>.md is written
#   KEEP=1             keep the temp dir (configs, logs, per-run values) for inspection
#   PERF_DIR=          many: record a system-wide `perf record -a -g` of each tool's run there
#   TARGET_FS=ext4     the hosts' home (where every tool writes): a fresh journaled ext4 on a loop
#                      device, like a server's disk; TARGET_FS=here keeps it on the machine's own
#                      file system (here an ext4 without a journal, which scans every inode deleted
#                      in the last minute on each file it creates: a cost that swamps the tools')
#
# Needs root (sshd switching users, useradd); installs OpenSSH client+server, time, inotify-tools,
# lsyncd and sqlite3 with apt-get if one is missing (lsyncd and sqlite3 are optional), and the peers
# of wan/fanout (rsync, pssh, ansible-core) through scripts/apt.sh (no service started). Everything
# listens on 127.0.0.0/8 only, or (bandwidth) in network namespaces made here (dspbench1-N, deleted
# on exit with their veths and qdiscs); every process started here is stopped by pid on exit. Timings are
# noisy on a shared machine: each workload runs RUNS times, tools in rotating order, and ratios are
# taken per run (dispatch and its peers measured minutes apart at most) before the median.
set -euo pipefail
export LC_ALL=C
unset SSH_AUTH_SOCK SSH_AGENT_PID || true

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
RUNS=${RUNS:-3}
SIZE_MB=${SIZE_MB:-1024}
NFILES=${NFILES:-200}
FILE_KB=${FILE_KB:-100}
SCALE_FILES=${SCALE_FILES:-100000}
LEGACY_TIMEOUT=${LEGACY_TIMEOUT:-600}
LEGACY_RUNS=${LEGACY_RUNS:-$RUNS}
LSYNCD_DELAYS=${LSYNCD_DELAYS:-0 15}
D_JOBS=${DISPATCH_JOBS:-8}            # dispatch's defaults
D_SESSIONS=${DISPATCH_SESSIONS:-2}
PORT=${BENCH_PORT:-2422}
WAN_FILES=${WAN_FILES:-200}
WAN_RTTS=${WAN_RTTS:-25 100}
BUSER=${BENCH_USER:-dsp-bench}
RESULTS_DIR=${RESULTS_DIR:-$HERE/results}
KEEP=${KEEP:-0}
TARGET_FS=${TARGET_FS:-ext4}
BW_MB=${BW_MB:-200}
BW_HOSTS=${BW_HOSTS:-8}
BW_RATE=${BW_RATE:-200mbit}
BW_BURST=${BW_BURST:-256kb}
BW_LATENCY=${BW_LATENCY:-50ms}
BW_PROBE_MB=${BW_PROBE_MB:-50}
BW_INSTALL=${BW_INSTALL:-wc}
BW_NET=10.231.77 # host i: root side .(4i-3), namespace side .(4i-2), a /30 each
FAN_HOSTS=${FANOUT_HOSTS:-64}
FAN_KB=${FANOUT_KB:-10}
FANOUT_RUNS=${FANOUT_RUNS:-10}
FANOUT_PEER_RUNS=${FANOUT_PEER_RUNS:-$RUNS}
FANOUT_JOBS=${FANOUT_JOBS:-$D_JOBS 64}
FANOUT_PEERS=${FANOUT_PEERS:-pssh ansible}
FANOUT_ANSIBLE_PERSIST=${FANOUT_ANSIBLE_PERSIST:-60s}
FAN_NET=127.0.1 # host i = 127.0.1.i
HOSTS=(127.0.0.2 127.0.0.3 127.0.0.4 127.0.0.5)
WORKLOADS=("$@")
[ ${#WORKLOADS[@]} -gt 0 ] || WORKLOADS=(throughput many dropdir scale)

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for w in "${WORKLOADS[@]}"; do
  case $w in throughput | many | dropdir | scale | wan | status | bandwidth | fanout) ;; -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
    *) die "unknown workload '$w' (throughput many dropdir scale wan status bandwidth fanout)" ;; esac
done
[ "$(id -u)" = 0 ] || die "must run as root (sshd needs it to switch users; useradd)"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
if ! [[ $BW_HOSTS =~ ^[1-9][0-9]*$ ]] || [ "$BW_HOSTS" -gt 63 ]; then die "BW_HOSTS must be 1-63"; fi
if ! [[ $FAN_HOSTS =~ ^[1-9][0-9]*$ ]] || [ "$FAN_HOSTS" -gt 254 ]; then die "FANOUT_HOSTS must be 1-254"; fi
[[ $FANOUT_RUNS =~ ^[1-9][0-9]*$ ]] || die "FANOUT_RUNS must be a positive integer"
case $BW_INSTALL in wc | sha256) ;; *) die "BW_INSTALL must be wc or sha256" ;; esac
wants() { [[ " ${WORKLOADS[*]} " == *" $1 "* ]]; }
# the peers and tools, installed if missing (Debian; skipped when apt-get is absent or offline)
BENCH_PKGS=(openssh-server openssh-client time iproute2 inotify-tools lsyncd sqlite3)
MISSING=0
for c in inotifywait lsyncd sqlite3 /usr/bin/time /usr/sbin/sshd ssh ss; do command -v "$c" >/dev/null || MISSING=1; done
if [ "$MISSING" = 1 ] && command -v apt-get >/dev/null; then
  log "installing ${BENCH_PKGS[*]} (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q "${BENCH_PKGS[@]}" >&2 ||
    log "apt-get install failed; going on with what is installed"
fi
for c in /usr/sbin/sshd ssh scp ssh-keygen /usr/bin/time sha256sum awk ss; do
  command -v "$c" >/dev/null || die "$c missing (apt-get install openssh-server openssh-client time iproute2)"
done
if ss -Hltn "sport = :$PORT" | grep -q .; then die "port $PORT is in use; set BENCH_PORT"; fi
# the peers of wan and fanout: installed now (not between measurements), without starting a service
ensure_pkg() { # package command... -> 0 if every command is there (installed with apt if missing)
  local pkg=$1 c miss=0
  shift
  for c; do command -v "$c" >/dev/null || miss=1; done
  [ $miss = 0 ] && return 0
  command -v apt-get >/dev/null || return 1
  log "installing $pkg (apt-get, through scripts/apt.sh: no service is started)"
  if [ -f "$REPO/scripts/apt.sh" ]; then
    # shellcheck source=../scripts/apt.sh
    (. "$REPO/scripts/apt.sh" && apt_install_quietly "$pkg") >&2 || log "installing $pkg failed"
  else
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q "$pkg" </dev/null >&2 || log "installing $pkg failed"
  fi
  hash -r
  for c; do command -v "$c" >/dev/null || return 1; done
}
HAVE_RSYNC=0 HAVE_PSSH=0 HAVE_ANSIBLE=0
if wants wan && ensure_pkg rsync rsync; then HAVE_RSYNC=1; fi
if wants fanout; then
  if [[ " $FANOUT_PEERS " == *" pssh "* ]] && ensure_pkg pssh parallel-ssh parallel-scp; then HAVE_PSSH=1; fi
  if [[ " $FANOUT_PEERS " == *" ansible "* ]] && ensure_pkg ansible-core ansible-playbook; then HAVE_ANSIBLE=1; fi
fi
if wants bandwidth; then
  if ! command -v tc >/dev/null || ! ip netns list >/dev/null 2>&1; then die "bandwidth needs ip netns and tc (iproute2)"; fi
fi

# ---------------------------------------------------------------- state, cleanup
W=$(mktemp -d /tmp/dsp-bench.XXXXXX)
chmod 755 "$W"
RHOME=$W/home                 # the bench user's home = the "remote" file systems
PIDS=()                       # every long-lived process started here
SSHD_PIDS=()
CG=''                         # cpuacct cgroup holding the sshd's (server CPU), if available
CREATED_USER=0
NETNS_MADE=()                 # network namespaces made here (bandwidth)
MOUNTED=0                     # RHOME is our loop-mounted ext4
TARGET_DESC="the machine's own file system ($(df -PT /tmp | awk 'NR == 2 { print $2 }'))"
TICK=$(getconf CLK_TCK)
exec {NAPFD}<> <(:)           # read -t on this fd = a sleep without a fork
nap() { read -r -t "$1" -u "$NAPFD" _ || true; }

stop_pid() { # pid [signal]: stop one process we started, wait (bounded), then KILL
  local p=$1 i
  kill -0 "$p" 2>/dev/null || return 0
  kill "-${2:-TERM}" "$p" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$p" 2>/dev/null || return 0; nap 0.05; done
  kill -KILL "$p" 2>/dev/null || true
}

cleanup() {
  set +e
  local p
  close_masters "$W/ansible/cp" # Ansible's ControlPersist masters (fanout), by their sockets
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  for p in "${NETNS_MADE[@]}"; do ip netns del "$p" 2>/dev/null; done # their veths and qdiscs go with them
  if [ "$CREATED_USER" = 1 ]; then
    # processes running as the bench user were started by our sshds (sessions, remote scp)
    for p in $(pgrep -u "$BUSER" 2>/dev/null); do kill "$p" 2>/dev/null; done
    userdel "$BUSER" 2>/dev/null
  fi
  if [ -n "$CG" ]; then
    for p in $(seq 50); do rmdir "$CG" 2>/dev/null && break; nap 0.1; done
  fi
  if [ "$MOUNTED" = 1 ]; then umount "$RHOME" 2>/dev/null || umount -l "$RHOME"; fi
  if [ "$KEEP" = 1 ]; then log "kept $W"; else rm -rf "$W"; fi
}
close_masters() { # dir: ask every OpenSSH ControlMaster listening on a socket there to exit
  local s
  for s in "$1"/*; do
    [ -S "$s" ] && ssh -F /dev/null -o ControlPath="$s" -O exit dsp-bench-master >/dev/null 2>&1
  done
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------- small helpers
calc() { awk "BEGIN { printf \"%.3f\", $* }"; }
fmt() { # number [decimals]
  case $1 in '' | - | n/a) printf '%s' "${1:--}" ;; *) awk -v v="$1" -v d="${2:-2}" 'BEGIN { printf "%.*f", d, v }' ;; esac
}
rec() { mkdir -p "$W/res"; printf '%s\n' "$4" >>"$W/res/$1.$2.$3"; } # workload tool metric value
med() { # workload tool metric -> median, or -
  local f=$W/res/$1.$2.$3
  [ -s "$f" ] || { printf -- -; return; }
  sort -g "$f" | awk '{ a[NR] = $1 } END { if (NR % 2) m = a[(NR + 1) / 2]; else m = (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.6g", m }'
}
vals() { # workload tool metric [decimals] -> "a, b, c"
  local f=$W/res/$1.$2.$3
  [ -s "$f" ] || { printf -- -; return; }
  awk -v d="${4:-2}" '{ printf "%s%.*f", (NR > 1 ? ", " : ""), d, $1 }' "$f"
}
sum() { local f=$W/res/$1.$2.$3; [ -s "$f" ] && awk '{ s += $1 } END { print s }' "$f" || printf 0; }
count() { local f=$W/res/$1.$2.$3; [ -s "$f" ] && wc -l <"$f" | tr -d ' ' || printf 0; }
yesno() { awk -v v="$1" -v t="$3" "BEGIN { if (v == \"-\" || v == \"\") { print \"n/a\"; exit } print ((v $2 t) ? \"yes\" : \"no\") }"; }
md() { printf '%s\n' "$@" >>"$W/report.md"; } # one line per argument
ctimes() { times >"$W/times.$1"; } # snapshot of CPU used by waited-for children (builtin: no fork)
cdelta() { # snapshot-a snapshot-b -> CPU seconds (user+sys) of the children reaped in between
  awk 'FNR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/); v = u[1] * 60 + u[2] + s[1] * 60 + s[2]; if (NR == FNR) a = v; else b = v }
       END { printf "%.3f", b - a }' "$W/times.$1" "$W/times.$2"
}
rotate() { # k items... -> the items rotated left by k
  local k=$1; shift
  local n=$# i a=("$@")
  for ((i = 0; i < n; i++)); do printf '%s\n' "${a[$(((i + k) % n))]}"; done
}
tv_field() { # /usr/bin/time -v file, field prefix
  awk -F': ' -v k="$2" 'index($0, k) { gsub(/^[ \t]+/, "", $2); print $2; exit }' "$1" 2>/dev/null
}
tv_rss_mb() { calc "$(tv_field "$1" 'Maximum resident set size (kbytes)') / 1024"; }
proc_stat() { # pid -> PSTAT: the fields of /proc/pid/stat after "(comm)" ([0] = state, [11] = utime)
  local line
  read -r line <"/proc/$1/stat" 2>/dev/null || return 1
  read -ra PSTAT <<<"${line##*) }"
}
proc_cpu_ticks() { proc_stat "$1" || return 1; echo $((PSTAT[11] + PSTAT[12])); }          # utime + stime
sshd_cpu() { # CPU seconds used so far by the sshd's and everything they started, once no session is left
  local p i busy
  for i in $(seq 250); do
    busy=0
    for p in "${SSHD_PIDS[@]}"; do if pgrep -P "$p" >/dev/null; then busy=1; fi; done
    [ $busy = 0 ] && break
    nap 0.02
  done
  # a cgroup counts exited processes too; the sshd listener's cutime does not see the sessions
  # (measured: 2 ticks for a 200 MB scp), so without a cgroup there is no server figure
  if [ -z "$CG" ]; then
    printf -- -
  elif [ -f "$CG/cpuacct.usage" ]; then
    read -r i <"$CG/cpuacct.usage" && calc "$i / 1e9"
  else
    awk '$1 == "usage_usec" { printf "%.3f", $2 / 1e6 }' "$CG/cpu.stat"
  fi
}
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# ---------------------------------------------------------------- the binary
GIT_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
GIT_DIRTY=
if git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q .; then GIT_DIRTY=" + uncommitted changes"; fi
if [ -n "${DISPATCH_BIN:-}" ]; then
  DISPATCH_DESC=${DISPATCH_DESC:-given as DISPATCH_BIN=$DISPATCH_BIN}
else
  DISPATCH_DESC="built from $REPO at $GIT_REV$GIT_DIRTY"
  log "building dispatch (cargo build --release in $REPO)"
  (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
  DISPATCH_BIN=$REPO/target/release/dispatch
fi
[ -x "$DISPATCH_BIN" ] || die "$DISPATCH_BIN is not an executable"
DISPATCH_BIN=$(readlink -f "$DISPATCH_BIN")
DISPATCH_SHA=$(sha256sum "$DISPATCH_BIN" | cut -c1-16)

# ---------------------------------------------------------------- hosts: user, keys, sshd per address
sshd_conf() { # tag address -> what every bench sshd's config holds (no Subsystem line)
  # Only what a test host needs is set. sshd defaults kept on purpose, because the comparison
  # depends on them: MaxStartups 10:30:100 (the legacy flood), MaxSessions 10 (multiplexing),
  # ciphers/KEX (chacha20-poly1305 first), UsePAM no (sshd's built-in default; Debian's shipped
  # config turns PAM on), LogLevel INFO.
  cat <<EOF
Port $PORT
ListenAddress $2
HostKey $W/host_ed25519
PidFile $W/sshd.$1.pid
AuthorizedKeysFile $W/ak/%u
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
EOF
}

setup_hosts() {
  mkdir -p /run/sshd && chmod 755 /run/sshd
  if id "$BUSER" >/dev/null 2>&1; then
    usermod -d "$RHOME" "$BUSER"
  else
    useradd -M -d "$RHOME" -s /bin/sh "$BUSER"
    CREATED_USER=1
  fi
  usermod -p '*' "$BUSER" # not locked ("!"), no password: sshd (UsePAM no) allows key login
  mkdir -p "$RHOME" "$W/ak" "$W/data" "$W/res" "$W/state" "$W/bin"
  if [ "$TARGET_FS" = ext4 ]; then
    # sparse: holds the largest workload (the throughput file) with room to spare; inode tables
    # and journal written now, not by ext4lazyinit in the background during the first runs
    local need_mb=$((SIZE_MB * 2))
    if wants bandwidth && [ $((BW_MB * BW_HOSTS * 5 / 4)) -gt $need_mb ]; then need_mb=$((BW_MB * BW_HOSTS * 5 / 4)); fi
    local gib=$(((need_mb + 1023) / 1024 + 2))
    if truncate -s "${gib}G" "$W/target.img" && mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$W/target.img" &&
      mount -o loop "$W/target.img" "$RHOME"; then
      MOUNTED=1
      TARGET_DESC="a fresh journaled ext4 (${gib} GiB loop device)"
    else
      log "warning: cannot loop-mount an ext4 image; the hosts write to $TARGET_DESC"
    fi
  fi
  chown "$BUSER:" "$RHOME"
  chmod 755 "$RHOME"
  ssh-keygen -q -t ed25519 -N '' -C dsp-bench-host -f "$W/host_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C dsp-bench-client -f "$W/client_ed25519"
  cp "$W/client_ed25519.pub" "$W/ak/$BUSER"
  : >"$W/known_hosts"
  local h i=0
  if [ -d /sys/fs/cgroup/cpuacct ] && mkdir "/sys/fs/cgroup/cpuacct/dsp-bench.$$" 2>/dev/null; then
    CG=/sys/fs/cgroup/cpuacct/dsp-bench.$$
  elif [ -f /sys/fs/cgroup/cgroup.controllers ] && mkdir "/sys/fs/cgroup/dsp-bench.$$" 2>/dev/null; then
    CG=/sys/fs/cgroup/dsp-bench.$$ # cgroup v2: cpu.stat usage_usec
  fi
  for h in "${HOSTS[@]}"; do
    i=$((i + 1))
    { sshd_conf "$i" "$h"; echo "Subsystem sftp /usr/lib/openssh/sftp-server"; } >"$W/sshd.$i.conf"
    /usr/sbin/sshd -t -f "$W/sshd.$i.conf" || die "sshd config $i invalid"
    (
      if [ -n "$CG" ]; then echo "$BASHPID" >"$CG/cgroup.procs"; fi
      exec /usr/sbin/sshd -D -f "$W/sshd.$i.conf" -E "$W/sshd.$i.log"
    ) &
    PIDS+=($!)
    SSHD_PIDS+=($!)
    echo "[$h]:$PORT $(cut -d' ' -f1,2 "$W/host_ed25519.pub")" >>"$W/known_hosts"
  done
  for h in "${HOSTS[@]}"; do
    for i in $(seq 100); do ss -Hltn "src $h:$PORT" | grep -q LISTEN && break; nap 0.05; done
    ss -Hltn "src $h:$PORT" | grep -q LISTEN || die "sshd on $h:$PORT did not start (see $W/sshd.*.log)"
  done
  SSH_OPTS=(-F /dev/null -o "Port=$PORT" -o "User=$BUSER" -o "IdentityFile=$W/client_ed25519"
    -o IdentitiesOnly=yes -o "UserKnownHostsFile=$W/known_hosts" -o GlobalKnownHostsFile=/dev/null
    -o StrictHostKeyChecking=yes -o BatchMode=yes -o Compression=no -o LogLevel=ERROR)
  for h in "${HOSTS[@]}"; do
    ssh "${SSH_OPTS[@]}" "$h" true || die "cannot log in to $h:$PORT as $BUSER (see $W/sshd.*.log)"
  done
  # the options, quoted, for helper scripts
  SSH_OPTS_Q=$(printf '%q ' "${SSH_OPTS[@]}")
  log "hosts up: ${HOSTS[*]} port $PORT, user $BUSER, dir $W"
}

dispatch_config() { # file section hosts dest_dir install_command [extra [dispatch] lines]
  local f=$1 section=$2 hosts=$3 dest=$4 install=$5 extra=${6:-} state
  state=$W/state/$(basename "$1" .ini)
  {
    echo "[dispatch]"
    echo "state_dir = $state"
    echo "jobs = $D_JOBS"
    echo "max_sessions_per_host = $D_SESSIONS"
    if [ -n "$extra" ]; then printf '%s\n' "$extra"; fi
    echo
    echo "[$section]"
    echo "host = $hosts"
    echo "port = $PORT"
    echo "login = $BUSER"
    echo "identity_file = $W/client_ed25519"
    echo "known_hosts = $W/known_hosts"
    echo "transfer = scp"
    echo "dest_dir = $dest"
    if [ -n "$install" ]; then echo "install_command = $install"; fi
  } >"$f"
}

# ================================================================= 1. throughput
wl_throughput() {
  local size=$((SIZE_MB * 1024 * 1024)) name=tp-${SIZE_MB}M.bin
  local f=$W/data/$name h=${HOSTS[0]} dir=$RHOME/tp
  log "throughput: making a $SIZE_MB MiB random file"
  head -c "$size" /dev/urandom >"$f"
  local want; want=$(sha256sum <"$f" | cut -d' ' -f1)
  install -d -o "$BUSER" "$dir"
  dispatch_config "$W/tp.ini" 'tp-' "$h" "$dir" ""
  local load0; load0=$(loadavg)
  local r tool
  for ((r = 1; r <= RUNS; r++)); do
    for tool in $(rotate $((r - 1)) dispatch scp scp-O); do
      rm -f "$dir/$name" "$dir/.$name.part"
      rm -rf "$W/state/tp"
      sync
      local c0 t0 t1 rc=0 out=$W/tp.$tool.$r
      c0=$(sshd_cpu)
      ctimes a
      t0=$EPOCHREALTIME
      case $tool in
        dispatch) /usr/bin/time -v -o "$out.time" "$DISPATCH_BIN" -c "$W/tp.ini" --json "$f" >"$out.out" 2>"$out.err" || rc=$? ;;
        scp) /usr/bin/time -v -o "$out.time" scp -q "${SSH_OPTS[@]}" "$f" "$h:$dir/" >"$out.out" 2>"$out.err" || rc=$? ;;
        scp-O) /usr/bin/time -v -o "$out.time" scp -O -q "${SSH_OPTS[@]}" "$f" "$h:$dir/" >"$out.out" 2>"$out.err" || rc=$? ;;
      esac
      t1=$EPOCHREALTIME
      ctimes b
      local secs; secs=$(calc "$t1 - $t0")
      local c1; c1=$(sshd_cpu)
      local got=none
      [ -f "$dir/$name" ] && got=$(sha256sum <"$dir/$name" | cut -d' ' -f1)
      if [ $rc = 0 ] && [ "$got" = "$want" ]; then
        local mbs; mbs=$(calc "$size / $secs / 1000000")
        rec tp "$tool" mbs "$mbs"
        rec tp "$tool" secs "$secs"
        rec tp "$tool" ccpu "$(cdelta a b)"
        rec tp "$tool" scpu "$(calc "$c1 - $c0")"
        rec tp "$tool" rss "$(tv_rss_mb "$out.time")"
        echo "$mbs" >"$W/tp.cur.$tool"
        log "throughput run $r: $tool $(fmt "$mbs" 0) MB/s ($(fmt "$secs") s), sha256 ok"
      else
        rec tp "$tool" fail 1
        rm -f "$W/tp.cur.$tool"
        log "throughput run $r: $tool FAILED (exit $rc, sha256 ${got:0:12} vs ${want:0:12}): $(tail -c 300 "$out.err" | tr '\n' ' ')"
      fi
    done
    for tool in scp scp-O; do
      if [ -f "$W/tp.cur.dispatch" ] && [ -f "$W/tp.cur.$tool" ]; then
        rec tp "$tool" ratio "$(calc "$(cat "$W/tp.cur.dispatch") / $(cat "$W/tp.cur.$tool")")"
      fi
    done
    rm -f "$W"/tp.cur.*
  done
  rm -f "$f" "$dir/$name"
  local rss ratio_scp ratio_o
  rss=$(med tp dispatch rss)
  ratio_scp=$(med tp scp ratio)
  ratio_o=$(med tp scp-O ratio)
  md ""
  md "## 1. Throughput: one ${SIZE_MB} MiB random file to one host"
  md ""
  md "Wall time from start to exit of the command; MB = 10^6 bytes. The remote file's sha256 is checked after every run (a run with a wrong or missing file counts as failed). Client CPU = user+sys of the command and its children (scp includes its ssh); server CPU = sshd session processes. Load average at start: $load0, at end: $(loadavg)."
  md ""
  md "| tool | MB/s (median) | MB/s per run | wall s (median) | client CPU s | server CPU s | failed runs | dispatch ÷ tool, speed (median of per-run ratios) |"
  md "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"
  for tool in dispatch scp scp-O; do
    local label=$tool ratio=''
    # shellcheck disable=SC2016 # backquotes are Markdown
    case $tool in
      dispatch) label='`dispatch` (ssh2/libssh2, scp protocol)'; ratio=1 ;;
      scp) label='OpenSSH `scp` (SFTP protocol)'; ratio=$ratio_scp ;;
      scp-O) label='OpenSSH `scp -O` (legacy scp protocol)'; ratio=$ratio_o ;;
    esac
    md "| $label | $(fmt "$(med tp "$tool" mbs)" 0) | $(vals tp "$tool" mbs 0) | $(fmt "$(med tp "$tool" secs)") | $(fmt "$(med tp "$tool" ccpu)") | $(fmt "$(med tp "$tool" scpu)") | $(count tp "$tool" fail) | $(fmt "$ratio")× |"
  done
  md ""
  md "| target | measured | met |"
  md "| --- | ---: | --- |"
  md "| dispatch ≥ 1.0× OpenSSH \`scp\` (same run) | $(fmt "$ratio_scp")× | $(yesno "$ratio_scp" '>=' 1.0) |"
  md "| dispatch ≥ 1.0× OpenSSH \`scp -O\` (same run) | $(fmt "$ratio_o")× | $(yesno "$ratio_o" '>=' 1.0) |"
  md "| dispatch peak RSS ≤ 32 MB (\`/usr/bin/time -v\`, median; runs: $(vals tp dispatch rss 1)) | $(fmt "$rss" 1) MB | $(yesno "$rss" '<=' 32) |"
}

# ================================================================= 2. many packages
write_many_helpers() {
  # legacy: one background job per file; per host a new ssh mkdir, scp, ssh install
  cat >"$W/bin/legacy_one.sh" <<EOF
#!/bin/bash
f=\$1 stamp=\$2 name=\${1##*/}
for h in ${HOSTS[*]}; do
  d=$RHOME/many/\$h/\$stamp
  ssh $SSH_OPTS_Q "\$h" "mkdir -p \$d" &&
    scp -q $SSH_OPTS_Q "\$f" "\$h:\$d/" &&
    ssh $SSH_OPTS_Q "\$h" "cd \$d && sha256sum \$name > \$name.installed" || echo "\$name \$h failed" >&2
done
EOF
  # multiplexed: every step through the host's ControlMaster; xargs -P8 runs 8 of these at once
  cat >"$W/bin/mux_one.sh" <<EOF
#!/bin/bash
stamp=\$1 f=\$2 h=\$3 name=\${2##*/}
d=$RHOME/many/\$h/\$stamp
o=(-o ControlPath=$W/cm-%h)
ssh "\${o[@]}" $SSH_OPTS_Q "\$h" "mkdir -p \$d" &&
  scp -q "\${o[@]}" $SSH_OPTS_Q "\$f" "\$h:\$d/" &&
  ssh "\${o[@]}" $SSH_OPTS_Q "\$h" "cd \$d && sha256sum \$name > \$name.installed" || echo "\$name \$h failed" >&2
EOF
  chmod +x "$W/bin/"*.sh
}

run_legacy() { # stamp files... ; one background job per file, all at once; bounded by LEGACY_TIMEOUT
  local stamp=$1 f p; shift
  local jobs=()
  for f in "$@"; do
    "$W/bin/legacy_one.sh" "$f" "$stamp" &
    jobs+=($!)
  done
  local deadline=$((SECONDS + LEGACY_TIMEOUT))
  for p in "${jobs[@]}"; do
    while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $deadline ]; do nap 0.05; done
    if kill -0 "$p" 2>/dev/null; then
      log "many/legacy: job $p still running after ${LEGACY_TIMEOUT}s; stopping it"
      pkill -P "$p" 2>/dev/null || true
      stop_pid "$p"
    fi
    wait "$p" 2>/dev/null || true
  done
}

run_mux() { # stamp files...
  local stamp=$1 h f i; shift
  local masters=()
  for h in "${HOSTS[@]}"; do
    ssh -M -N -o ControlPersist=no -o "ControlPath=$W/cm-%h" "${SSH_OPTS[@]}" "$h" &
    masters+=($!)
  done
  PIDS+=("${masters[@]}")
  for h in "${HOSTS[@]}"; do
    for i in $(seq 400); do ssh -O check -o "ControlPath=$W/cm-%h" "${SSH_OPTS[@]}" "$h" 2>/dev/null && break; nap 0.025; done
  done
  for f in "$@"; do for h in "${HOSTS[@]}"; do printf '%s\n%s\n' "$f" "$h"; done; done |
    xargs -d '\n' -n 2 -P 8 "$W/bin/mux_one.sh" "$stamp" ||
    true
  for h in "${HOSTS[@]}"; do ssh -O exit -o "ControlPath=$W/cm-%h" "${SSH_OPTS[@]}" "$h" 2>/dev/null || true; done
  for i in "${masters[@]}"; do stop_pid "$i"; wait "$i" 2>/dev/null || true; done
}

run_perhost() { # stamp files... ; per host: one mkdir, one scp of all files, one ssh running all installs
  perhost_to many SSH_OPTS "$@"
}

perhost_to() { # dir-under-home ssh-options-array-name stamp files... ; PH_HOSTS=array-name: other hosts than HOSTS
  local base=$1 stamp=$3 h
  local -n opts=$2 ph_hosts=${PH_HOSTS:-HOSTS}
  shift 3
  local names=() f jobs=()
  for f in "$@"; do names+=("${f##*/}"); done
  for h in "${ph_hosts[@]}"; do
    # shellcheck disable=SC2029 # expanded here on purpose
    (
      d=$RHOME/$base/$h/$stamp
      ssh "${opts[@]}" "$h" "mkdir -p $d" &&
        scp -q "${opts[@]}" "$@" "$h:$d/" &&
        ssh "${opts[@]}" "$h" "cd $d && for n in ${names[*]}; do sha256sum \$n > \$n.installed; done"
    ) &
    jobs+=($!)
  done
  for f in "${jobs[@]}"; do wait "$f" || true; done
}

verify_installed() { # base expected.sha256 -> number of (host, file) whose .installed matches the local sha256
  find "$1" -type f -name '*.installed' >"$W/installed.list"
  awk -v expf="$2" '
    BEGIN { while ((getline l < expf) > 0) { split(l, a, " "); want[a[2]] = a[1] } }
    {
      p = $0; n = split(p, parts, "/"); name = parts[n]; sub(/\.installed$/, "", name)
      host = parts[n - 2]
      if ((getline l < p) > 0) { split(l, a, " "); if (a[1] == want[name] && a[2] == name && !seen[host, name]++) ok++ }
      close(p)
    }
    END { print ok + 0 }' "$W/installed.list"
}

wl_many() {
  local dir=$W/data/many n_expected=$((NFILES * ${#HOSTS[@]}))
  rm -rf "$dir"
  mkdir -p "$dir"
  log "many: making $NFILES files of $FILE_KB KiB"
  head -c $((NFILES * FILE_KB * 1024)) /dev/urandom | split -b "${FILE_KB}k" -a 4 -d --additional-suffix=.tgz - "$dir/pkg-"
  local files=("$dir"/pkg-*.tgz)
  (cd "$dir" && sha256sum pkg-*.tgz) >"$W/data/many.sha256"
  write_many_helpers
  local hosts_csv; hosts_csv=$(printf '%s, ' "${HOSTS[@]}"); hosts_csv=${hosts_csv%, }
  # dest_dir relative to the login's home (`~/…`, resolved on the host), as the
  # default `~/newcx/%Y%m%d_%H%M%S` is; {host} because the four hosts share one
  # user and home here
  dispatch_config "$W/many.ini" 'pkg-' "$hosts_csv" "~/many/{host}/%Y%m%d_%H%M%S" 'sha256sum {name} > {name}.installed'
  install -d -o "$BUSER" "$RHOME/many"
  local load0; load0=$(loadavg)
  local r tool
  for ((r = 1; r <= RUNS; r++)); do
    local tools=(${MANY_TOOLS:-dispatch perhost mux}) # MANY_TOOLS: a subset, for quick comparisons
    [ "$r" -le "$LEGACY_RUNS" ] && tools+=(legacy)
    for tool in $(rotate $((r - 1)) "${tools[@]}"); do
      find "$RHOME/many" -mindepth 1 -delete
      rm -rf "$W/state/many"
      sync
      local c0 t0 t1 rc=0 out=$W/many.$tool.$r stamp
      c0=$(sshd_cpu)
      local perf_pid=
      if [ -n "${PERF_DIR:-}" ]; then # a system-wide profile of this run, for `perf report --sort comm`
        mkdir -p "$PERF_DIR"
        perf record -q -a -g -F 1000 -o "$PERF_DIR/many.$tool.$r.data" 2>/dev/null &
        perf_pid=$!
        sleep 0.5 # perf needs a moment before it records
      fi
      ctimes a
      t0=$EPOCHREALTIME
      printf -v stamp '%(%Y%m%d_%H%M%S)T' -1
      case $tool in
        dispatch) /usr/bin/time -v -o "$out.time" "$DISPATCH_BIN" -c "$W/many.ini" --json "${files[@]}" >"$out.out" 2>"$out.err" || rc=$? ;;
        perhost) run_perhost "$stamp" "${files[@]}" >"$out.out" 2>"$out.err" || rc=$? ;;
        mux) run_mux "$stamp" "${files[@]}" >"$out.out" 2>"$out.err" || rc=$? ;;
        legacy) run_legacy "$stamp" "${files[@]}" >"$out.out" 2>"$out.err" || rc=$? ;;
      esac
      t1=$EPOCHREALTIME
      ctimes b
      if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
      local secs c1 ok
      secs=$(calc "$t1 - $t0")
      c1=$(sshd_cpu)
      ok=$(verify_installed "$RHOME/many" "$W/data/many.sha256")
      rec many "$tool" secs "$secs"
      rec many "$tool" verified "$ok"
      rec many "$tool" scpu "$(calc "$c1 - $c0")"
      rec many "$tool" ccpu "$(cdelta a b)"
      [ -f "$out.time" ] && rec many "$tool" rss "$(tv_rss_mb "$out.time")"
      local extra=
      if [ "$tool" = dispatch ]; then
        local okl; okl=$(grep -c '"ok":true' "$out.out" || true)
        rec many dispatch results "$(wc -l <"$out.out" | tr -d ' ')"
        rec many dispatch okresults "$okl"
        extra=" ($okl/$n_expected results ok, exit $rc)"
      fi
      echo "$secs $ok" >"$W/many.cur.$tool"
      log "many run $r: $tool $(fmt "$secs") s, $ok/$n_expected installs verified$extra"
    done
    local d_secs d_ok
    read -r d_secs d_ok <"$W/many.cur.dispatch"
    if [ "$d_ok" = "$n_expected" ]; then
      rec many dispatch counted 1
      for tool in perhost mux legacy; do
        local p_secs
        [ -f "$W/many.cur.$tool" ] || continue
        read -r p_secs _ <"$W/many.cur.$tool"
        rec many "$tool" ratio "$(calc "$d_secs / $p_secs")"
      done
    else
      rec many dispatch notcounted 1
    fi
    rm -f "$W"/many.cur.*
  done
  find "$RHOME/many" -mindepth 1 -delete
  local dsecs rperhost
  dsecs=$(med many dispatch secs)
  rperhost=$(med many perhost ratio)
  md ""
  md "## 2. Many packages: $NFILES files × $FILE_KB KiB to ${#HOSTS[@]} hosts, each uploaded into a dated directory and installed"
  md ""
  md "Install command everywhere: \`sha256sum NAME > NAME.installed\`. *verified* = (host, file) pairs whose \`.installed\` holds the local sha256 of the file (of $n_expected). A dispatch run counts only if all $n_expected are verified; ratios are taken from those runs (time, dispatch ÷ tool: < 1 means dispatch is faster). Load average at start: $load0, at end: $(loadavg)."
  md ""
  md "| tool | wall s (median) | wall s per run | verified (per run) | result per package × host | client CPU s | server CPU s | dispatch ÷ tool, time |"
  md "| --- | ---: | --- | --- | --- | ---: | ---: | ---: |"
  md "| \`dispatch\` (jobs $D_JOBS, $D_SESSIONS sessions per host) | $(fmt "$dsecs") | $(vals many dispatch secs) | $(vals many dispatch verified 0) | yes ($(vals many dispatch okresults 0) ok lines) | $(fmt "$(med many dispatch ccpu)") | $(fmt "$(med many dispatch scpu)") | 1.00× |"
  md "| (a) legacy: per file a background job, per host new \`ssh mkdir\` + \`scp\` + \`ssh install\`, all $NFILES at once | $(fmt "$(med many legacy secs)") | $(vals many legacy secs) | $(vals many legacy verified 0) | yes (but many fail) | $(fmt "$(med many legacy ccpu)") | $(fmt "$(med many legacy scpu)") | $(fmt "$(med many legacy ratio)")× |"
  md "| (b) OpenSSH ControlMaster per host, \`xargs -P8\`: mkdir + scp + install per file × host | $(fmt "$(med many mux secs)") | $(vals many mux secs) | $(vals many mux verified 0) | yes | $(fmt "$(med many mux ccpu)") | $(fmt "$(med many mux scpu)") | $(fmt "$(med many mux ratio)")× |"
  md "| (c) per host: one \`scp\` of all files + one \`ssh\` running all installs (hosts in parallel) | $(fmt "$(med many perhost secs)") | $(vals many perhost secs) | $(vals many perhost verified 0) | no | $(fmt "$(med many perhost ccpu)") | $(fmt "$(med many perhost scpu)") | $(fmt "$rperhost")× |"
  md ""
  md "Legacy failed installs per run: $(awk -v n="$n_expected" '{ printf "%s%d", (NR > 1 ? ", " : ""), n - $1 }' "$W/res/many.legacy.verified" 2>/dev/null || echo -) of $n_expected. dispatch runs not counted (fewer than $n_expected verified): $(count many dispatch notcounted)."
  md ""
  md "| target | measured | met |"
  md "| --- | ---: | --- |"
  md "| dispatch ≤ (c) one scp + one ssh per host (same run) | $(fmt "$rperhost")× | $(yesno "$rperhost" '<=' 1.0) |"
  md "| dispatch ≤ 3 s | $(fmt "$dsecs") s | $(yesno "$dsecs" '<=' 3) |"
  md "| $n_expected/$n_expected verified, a result per package × host, every run | $(vals many dispatch verified 0) | $([ "$(count many dispatch notcounted)" = 0 ] && echo yes || echo no) |"
}

# ================================================================= 3. drop dir
DROP=$W/drop
STAGE=$W/stage
LATDIR=$RHOME/lat

start_dispatch_watch() { # config log -> pid in WATCH_PID; 1 if it did not become ready
  # WATCH_WRAP: a command the daemon runs under (valgrind)
  ${WATCH_WRAP:-} "$DISPATCH_BIN" -c "$1" -v watch >"$2" 2>&1 &
  WATCH_PID=$!
  PIDS+=("$WATCH_PID")
  local i
  # ready = it logged "watching …" (info); the start-up scan is only logged at debug, which also
  # logs every file, so give the scan of a (small) dir half a second
  for i in $(seq "${WATCH_READY_POLLS:-600}"); do
    if grep -q 'watching' "$2" 2>/dev/null; then nap 0.5; return 0; fi
    kill -0 $WATCH_PID 2>/dev/null || return 1
    nap 0.05
  done
  return 1
}

start_inotify_peer() { # the loop an operator writes today: inotifywait + scp + ssh per event
  local h=${HOSTS[0]}
  cat >"$W/bin/inotify_peer.sh" <<EOF
#!/bin/bash
rm -f "$W/inotify.fifo"; mkfifo "$W/inotify.fifo"
inotifywait -m -e close_write,moved_to --format '%f' "$DROP" >"$W/inotify.fifo" 2>"$W/inotify.err" &
echo \$! >"$W/inotify.pid"
while IFS= read -r f; do
  scp -q $SSH_OPTS_Q "$DROP/\$f" "$h:$LATDIR/" &&
    ssh $SSH_OPTS_Q "$h" "cd $LATDIR && sha256sum \$f >> \$f.installed"
done <"$W/inotify.fifo"
EOF
  chmod +x "$W/bin/inotify_peer.sh"
  rm -f "$W/inotify.pid" "$W/inotify.err"
  "$W/bin/inotify_peer.sh" >"$W/inotify.log" 2>&1 &
  PEER_PID=$!
  PIDS+=("$PEER_PID")
  local i
  for i in $(seq 200); do
    [ -s "$W/inotify.pid" ] && grep -q 'Watches established' "$W/inotify.err" 2>/dev/null && break
    nap 0.05
  done
  PEER_SUB=$(cat "$W/inotify.pid" 2>/dev/null || true)
  [ -n "$PEER_SUB" ] && PIDS+=("$PEER_SUB")
  grep -q 'Watches established' "$W/inotify.err" 2>/dev/null
}

start_lsyncd_peer() { # delay
  local h=${HOSTS[0]} d=$1
  local cmd="scp -q $SSH_OPTS_Q \"\$1\" $h:$LATDIR/ && ssh $SSH_OPTS_Q $h \"cd $LATDIR && sha256sum \$2 >> \$2.installed\""
  cat >"$W/lsyncd.$d.lua" <<EOF
settings { nodaemon = true, logfile = "$W/lsyncd.$d.log", statusFile = "$W/lsyncd.$d.status", inotifyMode = "CloseWrite" }
local bench = {
  delay = $d,
  maxProcesses = 1,
  action = function(inlet)
    local ev = inlet.getEvent()
    if ev.isdir or ev.etype == "Delete" then inlet.discardEvent(ev); return end
    spawnShell(ev, [[$cmd]], ev.sourcePath, ev.name)
  end,
}
sync { bench, source = "$DROP/" }
EOF
  lsyncd "$W/lsyncd.$d.lua" >"$W/lsyncd.$d.out" 2>&1 &
  PEER_PID=$!
  PEER_SUB=''
  PIDS+=("$PEER_PID")
  local i
  for i in $(seq 100); do
    grep -q 'Startup' "$W/lsyncd.$d.log" 2>/dev/null && { nap 0.5; return 0; }
    kill -0 $PEER_PID 2>/dev/null || return 1
    nap 0.05
  done
  return 1
}

stop_peer() {
  [ -n "${PEER_SUB:-}" ] && stop_pid "$PEER_SUB"
  [ -n "${PEER_PID:-}" ] && { stop_pid "$PEER_PID"; wait "$PEER_PID" 2>/dev/null || true; }
  PEER_PID='' PEER_SUB=''
}

latency_sample() { # tool run -> records dd latency; the watcher must be running
  local tool=$1 r=$2 name=lat-$1-$2.bin
  head -c 1048576 /dev/urandom >"$STAGE/$name"
  local want; want=$(sha256sum <"$STAGE/$name" | cut -d' ' -f1)
  local marker=$LATDIR/$name.installed t0 t1 limit
  t0=$EPOCHREALTIME
  mv "$STAGE/$name" "$DROP/$name"
  limit=$((SECONDS + 60))
  while [ ! -s "$marker" ] && [ $SECONDS -lt $limit ]; do nap 0.005; done
  t1=$EPOCHREALTIME
  local got=none
  [ -s "$marker" ] && read -r got _ <"$marker"
  if [ "$got" = "$want" ]; then
    rec dd "$tool" lat "$(calc "$t1 - $t0")"
    log "dropdir run $r: $tool renamed-in 1 MiB installed after $(fmt "$(calc "$t1 - $t0")" 3) s"
  else
    rec dd "$tool" latfail 1
    log "dropdir run $r: $tool: no correct marker within 60 s"
  fi
}

slow_sample() { # tool run mode(1fd|reopen): 10 MiB written in place in 10 chunks over ~3 s
  local tool=$1 r=$2 mode=$3 name=slow-$3-$1-$2.bin
  head -c $((10 * 1048576)) /dev/urandom >"$STAGE/$name.src"
  local want; want=$(sha256sum <"$STAGE/$name.src" | cut -d' ' -f1)
  local marker=$LATDIR/$name.installed i
  if [ "$mode" = 1fd ]; then
    exec {wfd}>"$DROP/$name"
    for i in $(seq 0 9); do dd if="$STAGE/$name.src" bs=1M skip="$i" count=1 status=none >&"$wfd"; nap 0.33; done
    exec {wfd}>&-
  else
    for i in $(seq 0 9); do dd if="$STAGE/$name.src" bs=1M skip="$i" count=1 status=none >>"$DROP/$name"; nap 0.33; done
  fi
  local t0=$EPOCHREALTIME limit=$((SECONDS + 90)) lines=()
  while [ $SECONDS -lt $limit ]; do
    if [ -s "$marker" ]; then
      mapfile -t lines <"$marker"
      [[ " ${lines[*]} " == *" $want "* ]] && break
    fi
    nap 0.01
  done
  local t1=$EPOCHREALTIME
  nap 2 # stragglers
  local total=0 partial=0 final=0
  if [ -f "$marker" ]; then
    total=$(wc -l <"$marker" | tr -d ' ')
    final=$(grep -c "^$want " "$marker" || true)
    partial=$((total - final))
  fi
  rec dd "$tool" "partial_$mode" "$partial"
  rec dd "$tool" "installs_$mode" "$total"
  if [ "$final" -gt 0 ]; then
    rec dd "$tool" "after_$mode" "$(calc "$t1 - $t0")"
  else
    rec dd "$tool" "finalfail_$mode" 1
  fi
  log "dropdir run $r: $tool slow writer ($mode): $total install(s), $partial of other content, final installed $(fmt "$(calc "$t1 - $t0")") s after close"
  rm -f "$STAGE/$name.src"
}

wl_dropdir() {
  mkdir -p "$DROP" "$STAGE"
  install -d -o "$BUSER" "$LATDIR"
  local tools=(dispatch inotify) d
  if command -v lsyncd >/dev/null; then
    for d in $LSYNCD_DELAYS; do tools+=("lsyncd-d$d"); done
  fi
  command -v inotifywait >/dev/null || die "inotifywait missing (apt-get install inotify-tools)"
  local h=${HOSTS[0]} load0 tool r notes=()
  load0=$(loadavg)
  dispatch_config "$W/dd.ini" '(lat|slow)-' "$h" "$LATDIR" 'sha256sum {name} >> {name}.installed' "watch = $DROP"
  for tool in "${tools[@]}"; do
    local ready=0
    case $tool in
      dispatch) start_dispatch_watch "$W/dd.ini" "$W/dd.daemon.log" && ready=1 ;;
      inotify) start_inotify_peer && ready=1 ;;
      lsyncd-d*) start_lsyncd_peer "${tool#lsyncd-d}" && ready=1 ;;
    esac
    if [ $ready = 0 ]; then
      log "dropdir: $tool did not start; not measured"
      notes+=("$tool did not become ready")
      rec dd "$tool" notready 1
      if [ "$tool" = dispatch ]; then stop_pid "$WATCH_PID"; else stop_peer; fi
      continue
    fi
    log "dropdir: $tool watching $DROP"
    for ((r = 1; r <= RUNS; r++)); do
      latency_sample "$tool" "$r"
      slow_sample "$tool" "$r" 1fd
      slow_sample "$tool" "$r" reopen
    done
    if [ "$tool" = dispatch ]; then
      stop_pid "$WATCH_PID"
      wait "$WATCH_PID" 2>/dev/null || true
    else
      stop_peer
    fi
    find "$DROP" -mindepth 1 -delete
  done
  local lat; lat=$(med dd dispatch lat)
  md ""
  md "## 3. Drop directory: latency and half-written files (one host)"
  md ""
  md "*latency*: a 1 MiB file renamed into the drop dir → its \`.installed\` marker (correct sha256) appears on the target; polled every 5 ms. *slow writer*: 10 MiB written in place in 10 chunks over ~3.3 s, either through one open file (\`1fd\`: one close at the end) or re-opened per chunk (\`reopen\`: \`>>\` per chunk, a close each time). Every install appends the sha256 of what it found to the marker, so *partial* = installs of content other than the final file. *after close* = from the writer's last close until the final content is installed. dispatch runs with its defaults (\`settle\` 2 s). The inotify peer is \`inotifywait -m -e close_write,moved_to\` feeding \`scp\` + \`ssh\` per event; lsyncd ($(lsyncd --version 2>/dev/null | head -1 || echo 'not installed')) runs a custom action doing the same \`scp\` + \`ssh\`, \`maxProcesses = 1\`, at the given \`delay\`. Load average at start: $load0, at end: $(loadavg)."
  md ""
  md "| tool | latency s (median) | latency per run | slow 1fd: partial / installs (all runs) | slow 1fd: after close s (median) | slow reopen: partial / installs | slow reopen: after close s (median) |"
  md "| --- | ---: | --- | --- | ---: | --- | ---: |"
  for tool in "${tools[@]}"; do
    if [ "$(count dd "$tool" notready)" != 0 ]; then
      md "| $tool | not measured (did not start) | | | | | |"
      continue
    fi
    local fails; fails=$(count dd "$tool" latfail)
    md "| $tool | $(fmt "$(med dd "$tool" lat)" 3) | $(vals dd "$tool" lat 3)$([ "$fails" != 0 ] && echo " ($fails failed)") | $(sum dd "$tool" partial_1fd) / $(sum dd "$tool" installs_1fd) | $(fmt "$(med dd "$tool" after_1fd)") | $(sum dd "$tool" partial_reopen) / $(sum dd "$tool" installs_reopen) | $(fmt "$(med dd "$tool" after_reopen)") |"
  done
  command -v lsyncd >/dev/null || md "" "lsyncd: not measured (not installed; \`apt-get install lsyncd\`)."
  [ ${#notes[@]} -gt 0 ] && md "" "Not measured: ${notes[*]}."
  local partials; partials=$(($(sum dd dispatch partial_1fd) + $(sum dd dispatch partial_reopen)))
  local dready=1; [ "$(count dd dispatch notready)" != 0 ] && dready=0
  md ""
  md "| target | measured | met |"
  md "| --- | ---: | --- |"
  if [ $dready = 1 ]; then
    md "| renamed in → installed ≤ 0.35 s | $(fmt "$lat" 3) s | $(yesno "$lat" '<=' 0.35) |"
    md "| 0 half-written uploads from a slow in-place writer | $partials | $([ "$partials" = 0 ] && [ "$(count dd dispatch finalfail_1fd)$(count dd dispatch finalfail_reopen)" = 00 ] && echo yes || echo no) |"
  else
    md "| renamed in → installed ≤ 0.35 s | not measured (\`dispatch watch\` not ready) | n/a |"
    md "| 0 half-written uploads | not measured | n/a |"
  fi
}

# ================================================================= 4. scale
journal_count() { # state_dir -> deliveries recorded as done, or - without sqlite3
  command -v sqlite3 >/dev/null || { echo -; return; }
  sqlite3 -readonly "$1/journal.sqlite" "select count(*) from delivery where state in ('installed','uploaded')" 2>/dev/null || echo -
}

wl_scale() {
  local drop=$W/scale-drop h=${HOSTS[0]} rdir=$RHOME/scale/${HOSTS[0]}
  rm -rf "$drop"
  mkdir -p "$drop"
  install -d -o "$BUSER" "$RHOME/scale" "$rdir"
  log "scale: creating $SCALE_FILES files"
  local i
  local nm
  for ((i = 0; i < SCALE_FILES; i++)); do
    printf -v nm 's-%07d' $i
    printf '%s\n' "$nm" >"$drop/$nm" # unique content: no two files look like one package
  done
  touch -d '-1 min' "$drop"/ 2>/dev/null || true
  find "$drop" -type f -exec touch -d '-1 min' {} +
  # a trivial install; 8 sessions to the one host so the warm-up does not take all day
  dispatch_config "$W/scale.ini" 's-' "$h" "$RHOME/scale/{host}" 'true' "$(printf 'watch = %s\nsettle = 2s' "$drop")"
  sed -i 's/^max_sessions_per_host = .*/max_sessions_per_host = 8/' "$W/scale.ini"
  local load0; load0=$(loadavg)
  log "scale: warm-up (every file dispatched once, journal filled)"
  local t0=$EPOCHREALTIME last=-1 stall=$SECONDS n=0
  start_dispatch_watch "$W/scale.ini" "$W/scale.warm.log" || {
    md "" "## 4. Scale: drop dir of $SCALE_FILES files" "" "Not measured: \`dispatch watch\` did not start (log: $(tail -3 "$W/scale.warm.log" | tr '\n' ' '))."
    stop_pid "$WATCH_PID"
    return 0
  }
  while :; do
    n=$(journal_count "$W/state/scale")
    [ "$n" = - ] && n=$(find "$rdir" -maxdepth 1 -type f ! -name '.*' | wc -l)
    [ "$n" -ge "$SCALE_FILES" ] && break
    [ "$n" != "$last" ] && { last=$n; stall=$SECONDS; }
    kill -0 "$WATCH_PID" 2>/dev/null || break
    [ $((SECONDS - stall)) -gt 180 ] && { log "scale: warm-up made no progress for 180 s (at $n)"; break; }
    nap 2
  done
  local warm_s; warm_s=$(calc "$EPOCHREALTIME - $t0")
  stop_pid "$WATCH_PID"
  wait "$WATCH_PID" 2>/dev/null || true
  n=$(journal_count "$W/state/scale")
  log "scale: warm-up done in $(fmt "$warm_s" 0) s, journal shows $n done"
  md ""
  md "## 4. Scale: a drop dir holding $SCALE_FILES files, journal warm"
  md ""
  if [ "$n" = - ] || [ "$n" -lt "$SCALE_FILES" ]; then
    md "Not measured: the warm-up did not record every file ($n of $SCALE_FILES in the journal after $(fmt "$warm_s" 0) s; log tail: $(tail -2 "$W/scale.warm.log" | tr '\n' ' ' | cut -c1-300))."
    return 0
  fi
  local r
  for ((r = 1; r <= RUNS; r++)); do
    touch "$W/scale.mark"
    nap 1.1
    local log=$W/scale.run$r.log st c idle_at='' n_s=0 j k now
    local -a ts=() cs=()
    st=${EPOCHREALTIME/./} # microseconds
    "$DISPATCH_BIN" -c "$W/scale.ini" -v watch >"$log" 2>&1 &
    WATCH_PID=$!
    PIDS+=("$WATCH_PID")
    # idle = CPU time (utime+stime) grows by less than 2 ticks within 1 s; the catch-up ends where
    # that quiet second starts
    while :; do
      proc_stat "$WATCH_PID" || break
      c=$((PSTAT[11] + PSTAT[12]))
      now=${EPOCHREALTIME/./}
      ts+=("$now")
      cs+=("$c")
      n_s=$((n_s + 1))
      k=-1
      for ((j = n_s - 1; j >= 0; j--)); do
        if ((now - ts[j] >= 1000000)); then k=$j; break; fi
      done
      if ((k >= 0 && c - cs[k] < 2)); then
        # the work ended at the last sample (up to the quiet second's start) where CPU time grew
        idle_at=${ts[0]}
        for ((j = k; j >= 1; j--)); do
          if ((cs[j] != cs[j - 1])); then idle_at=${ts[$j]}; break; fi
        done
        break
      fi
      ((now - st > 120000000)) && break
      nap 0.05
    done
    if [ -z "$idle_at" ]; then
      log "scale run $r: not idle within 120 s"
      rec scale dispatch notidle 1
    else
      local catch; catch=$(calc "($idle_at - $st) / 1000000")
      local c1 c2 idle_ms
      c1=$(proc_cpu_ticks "$WATCH_PID")
      nap 10
      c2=$(proc_cpu_ticks "$WATCH_PID")
      idle_ms=$(calc "($c2 - $c1) * 1000 / $TICK")
      local hwm rss
      hwm=$(awk '/^VmHWM/ { print $2 / 1024 }' "/proc/$WATCH_PID/status")
      rss=$(awk '/^VmRSS/ { print $2 / 1024 }' "/proc/$WATCH_PID/status")
      local again; again=$(find "$rdir" -newer "$W/scale.mark" -type f | wc -l)
      rec scale dispatch catchup "$catch"
      rec scale dispatch idle_ms "$idle_ms"
      rec scale dispatch hwm "$hwm"
      rec scale dispatch rss "$rss"
      rec scale dispatch again "$again"
      log "scale run $r: idle $(fmt "$catch") s after start, then $(fmt "$idle_ms" 0) ms CPU in 10 s, VmHWM $(fmt "$hwm" 1) MB, re-sent $again"
    fi
    stop_pid "$WATCH_PID"
    wait "$WATCH_PID" 2>/dev/null || true
  done
  local catch idle hwm
  catch=$(med scale dispatch catchup)
  idle=$(med scale dispatch idle_ms)
  hwm=$(med scale dispatch hwm)
  md "Warm-up (not part of the targets): \`dispatch watch\` sent all $SCALE_FILES files (install \`true\`, 8 sessions to one host) in $(fmt "$warm_s" 0) s = $(fmt "$(calc "$SCALE_FILES / $warm_s")" 0) files/s. Then the daemon is restarted $RUNS times on the unchanged dir. *catch-up* = from start to the last 50 ms sample at which its CPU time (utime+stime, /proc/PID/stat) still grew, before a second in which it grew by less than 2 ticks (20 ms); *idle CPU* = CPU time used in the following 10 s; RSS from /proc/PID/status. *re-sent* = remote files modified during the restart (must be 0). Load average at start: $load0, at end: $(loadavg)."
  md ""
  md "| metric | median | per run | target | met |"
  md "| --- | ---: | --- | --- | --- |"
  md "| catch-up until idle, s | $(fmt "$catch") | $(vals scale dispatch catchup) | ≤ 2 s | $(yesno "$catch" '<=' 2) |"
  md "| idle CPU, ms per 10 s | $(fmt "$idle" 0) | $(vals scale dispatch idle_ms 0) | ≈ 0 (≤ 100 ms = 1 %) | $(yesno "$idle" '<=' 100) |"
  md "| peak RSS (VmHWM), MB | $(fmt "$hwm" 1) | $(vals scale dispatch hwm 1) | ≤ 64 MB | $(yesno "$hwm" '<=' 64) |"
  md "| RSS when idle (VmRSS), MB | $(fmt "$(med scale dispatch rss)" 1) | $(vals scale dispatch rss 1) | | |"
  md "| files re-sent on restart | $(sum scale dispatch again) | $(vals scale dispatch again 0) | 0 | $([ "$(sum scale dispatch again)" = 0 ] && echo yes || echo no) |"
  [ "$(count scale dispatch notidle)" != 0 ] && md "" "Runs that did not become idle within 120 s: $(count scale dispatch notidle)."
  find "$drop" -mindepth 1 -delete
}

# ================================================================= 5. WAN (delayed round trips)
# Every host behind bench/delayproxy.py on 127.0.0.x:$WAN_PORT, holding each byte RTT/2 each
# way. Peers: one `tar c | ssh 'tar x && installs'` stream per host (the streaming floor),
# one scp + one ssh per host, and one `rsync -e ssh` of all files + one ssh per host.
WAN_PORT=$((PORT + 1000))

run_wan_tar() { # stamp files...
  local stamp=$1 h jobs=() names=() f; shift
  for f in "$@"; do names+=("${f##*/}"); done
  for h in "${HOSTS[@]}"; do
    # shellcheck disable=SC2029 # expanded here on purpose
    (
      d=$RHOME/wan/$h/$stamp
      tar -C "${1%/*}" -cf - "${names[@]}" |
        ssh "${WAN_OPTS[@]}" "$h" "mkdir -p $d && tar -C $d -xf - && cd $d && for n in ${names[*]}; do sha256sum \$n > \$n.installed; done"
    ) &
    jobs+=($!)
  done
  for f in "${jobs[@]}"; do wait "$f" || true; done
}

run_wan_rsync() { # stamp files... ; per host: one rsync over ssh of all files (it makes the dated dir), one ssh running the installs
  local stamp=$1 h jobs=() names=() f; shift
  for f in "$@"; do names+=("${f##*/}"); done
  for h in "${HOSTS[@]}"; do
    # shellcheck disable=SC2029 # expanded here on purpose
    (
      d=$RHOME/wan/$h/$stamp
      rsync -a --mkpath -e "ssh ${WAN_OPTS[*]}" "$@" "$h:$d/" &&
        ssh "${WAN_OPTS[@]}" "$h" "cd $d && for n in ${names[*]}; do sha256sum \$n > \$n.installed; done"
    ) &
    jobs+=($!)
  done
  for f in "${jobs[@]}"; do wait "$f" || true; done
}

wl_wan() {
  local dir=$W/data/wan n_expected=$((WAN_FILES * ${#HOSTS[@]})) h rtt r tool
  command -v python3 >/dev/null || { md "" "## 5. WAN" "" "Not measured: no python3 for the delaying proxy."; return 0; }
  rm -rf "$dir"
  mkdir -p "$dir"
  log "wan: making $WAN_FILES files of $FILE_KB KiB"
  head -c $((WAN_FILES * FILE_KB * 1024)) /dev/urandom | split -b "${FILE_KB}k" -a 4 -d --additional-suffix=.tgz - "$dir/pkg-"
  local files=("$dir"/pkg-*.tgz)
  (cd "$dir" && sha256sum pkg-*.tgz) >"$W/data/wan.sha256"
  for h in "${HOSTS[@]}"; do
    echo "[$h]:$WAN_PORT $(cut -d' ' -f1,2 "$W/host_ed25519.pub")" >>"$W/known_hosts"
  done
  WAN_OPTS=("${SSH_OPTS[@]/#Port=$PORT/Port=$WAN_PORT}")
  local hosts_csv; hosts_csv=$(printf '%s, ' "${HOSTS[@]}"); hosts_csv=${hosts_csv%, }
  dispatch_config "$W/wan.ini" 'pkg-' "$hosts_csv" "~/wan/{host}/%Y%m%d_%H%M%S" 'sha256sum {name} > {name}.installed'
  sed -i "s/^port = .*/port = $WAN_PORT/" "$W/wan.ini"
  install -d -o "$BUSER" "$RHOME/wan"
  local load0; load0=$(loadavg)
  md "" "## 5. WAN: $WAN_FILES files × $FILE_KB KiB to ${#HOSTS[@]} hosts, installed, each host behind a delaying proxy" ""
  local wan_tools=(dispatch tar perhost) rsync_v=
  if [ "$HAVE_RSYNC" = 1 ]; then
    wan_tools+=(rsync)
    rsync_v=$(rsync --version | awk 'NR == 1 { print $3; exit }')
  fi
  md "Each host is reached through \`bench/delayproxy.py\` (every byte held RTT/2 each way; this kernel has no netem). Install command everywhere: \`sha256sum NAME > NAME.installed\`; *verified* as in §2 (of $n_expected). Peers, per host and hosts in parallel: *tar* = one \`tar c | ssh 'mkdir && tar x && installs'\`; *perhost* = \`ssh mkdir\` + one \`scp\` of all files + one \`ssh\` running the installs; *rsync* = one \`rsync -a --mkpath -e ssh\` of all files (rsync ${rsync_v:-not installed}; it makes the dated dir) + one \`ssh\` running the installs. Ratios: dispatch ÷ tool, same run. Load average at start: $load0." ""
  md "| RTT | tool | wall s (median) | wall s per run | verified (per run) | dispatch ÷ tool, time |" "| ---: | --- | ---: | --- | --- | ---: |"
  for rtt in $WAN_RTTS; do
    local proxies=()
    for h in "${HOSTS[@]}"; do
      python3 "$HERE/delayproxy.py" "$h" "$WAN_PORT" "$h" "$PORT" "$(calc "$rtt / 2")" &
      proxies+=($!)
    done
    PIDS+=("${proxies[@]}")
    for h in "${HOSTS[@]}"; do
      local i
      for i in $(seq 200); do (exec 3<>"/dev/tcp/$h/$WAN_PORT") 2>/dev/null && break; nap 0.025; done
    done
    local wl=wan$rtt
    for ((r = 1; r <= RUNS; r++)); do
      for tool in $(rotate $((r - 1)) "${wan_tools[@]}"); do
        find "$RHOME/wan" -mindepth 1 -delete
        rm -rf "$W/state/wan"
        sync
        local t0 t1 rc=0 out=$W/wan.$tool.$r stamp secs ok
        printf -v stamp '%(%Y%m%d_%H%M%S)T' -1
        t0=$EPOCHREALTIME
        case $tool in
          dispatch) "$DISPATCH_BIN" -c "$W/wan.ini" --json "${files[@]}" >"$out.out" 2>"$out.err" || rc=$? ;;
          tar) run_wan_tar "$stamp" "${files[@]}" >"$out.out" 2>"$out.err" || rc=$? ;;
          perhost) perhost_to wan WAN_OPTS "$stamp" "${files[@]}" >"$out.out" 2>"$out.err" || rc=$? ;;
          rsync) run_wan_rsync "$stamp" "${files[@]}" >"$out.out" 2>"$out.err" || rc=$? ;;
        esac
        t1=$EPOCHREALTIME
        secs=$(calc "$t1 - $t0")
        ok=$(verify_installed "$RHOME/wan" "$W/data/wan.sha256")
        rec "$wl" "$tool" secs "$secs"
        rec "$wl" "$tool" verified "$ok"
        echo "$secs $ok" >"$W/wan.cur.$tool"
        log "wan ${rtt} ms run $r: $tool $(fmt "$secs") s, $ok/$n_expected installs verified (exit $rc)"
      done
      local d_secs d_ok p_secs
      read -r d_secs d_ok <"$W/wan.cur.dispatch"
      if [ "$d_ok" = "$n_expected" ]; then
        for tool in "${wan_tools[@]:1}"; do
          read -r p_secs _ <"$W/wan.cur.$tool"
          rec "$wl" "$tool" ratio "$(calc "$d_secs / $p_secs")"
        done
      fi
      rm -f "$W"/wan.cur.*
    done
    for h in "${proxies[@]}"; do stop_pid "$h"; done
    for tool in "${wan_tools[@]}"; do
      local per vers ratio=1.00
      per=$(xargs printf '%.2f, ' <"$W/res/$wl.$tool.secs")
      vers=$(paste -sd, "$W/res/$wl.$tool.verified" | sed 's/,/, /g')
      [ "$tool" != dispatch ] && [ -s "$W/res/$wl.$tool.ratio" ] && ratio=$(fmt "$(med "$wl" "$tool" ratio)" 2)
      md "| $rtt ms | $tool | $(fmt "$(med "$wl" "$tool" secs)") | ${per%, } | $vers | ${ratio}× |"
    done
  done
  find "$RHOME/wan" -mindepth 1 -delete
  md "" "Issue target (W5): dispatch ≤ 1.5× the time of one \`tar | ssh\` stream per host, at both RTTs."
  [ "$HAVE_RSYNC" = 1 ] || md "" "rsync: not measured (not installed, and apt-get could not install it)."
}

# ================================================================= 6. status server overhead
status_clients() { # ADDRESS:PORT -> the daemon's count of event-stream clients, or -1
  curl -s --max-time 2 "http://$1/metrics" 2>/dev/null | awk '/^dispatch_status_clients / { print $2; f = 1 } END { if (!f) print -1 }'
}

# The daemon delivering NFILES packages (renamed into its drop dir at once) to every host, with
# the status server off, and on with one client following /api/v1/events (curl -N) — and with
# STATUS_POLL=1 another reading /api/v1/status and /metrics every 0.5 s (a curl per request:
# mostly the cost of starting curl). Time = from the rename to the last delivery the journal
# records as done (run.updated_ms).
wl_status() {
  local src=$W/data/status drop=$W/status-drop n_expected=$((NFILES * ${#HOSTS[@]}))
  local saddr=127.0.0.1:$((PORT + 2000))
  rm -rf "$src" "$drop"
  mkdir -p "$src" "$drop"
  log "status: making $NFILES files of $FILE_KB KiB"
  head -c $((NFILES * FILE_KB * 1024)) /dev/urandom | split -b "${FILE_KB}k" -a 4 -d --additional-suffix=.tgz - "$src/st-"
  local hosts_csv; hosts_csv=$(printf '%s, ' "${HOSTS[@]}"); hosts_csv=${hosts_csv%, }
  install -d -o "$BUSER" "$RHOME/status"
  local load0; load0=$(loadavg)
  local r mode
  for ((r = 1; r <= RUNS; r++)); do
    for mode in $(rotate $((r - 1)) off idle on); do
      find "$RHOME/status" -mindepth 1 -delete
      rm -rf "$W/state/status-$mode"
      local listen=off; [ "$mode" != off ] && listen=$saddr
      dispatch_config "$W/status-$mode.ini" 'st-' "$hosts_csv" "~/status/{host}/%Y%m%d_%H%M%S" \
        'sha256sum {name} > {name}.installed' "$(printf 'watch = %s\nstatus_listen = %s' "$drop" "$listen")"
      sync
      if ! start_dispatch_watch "$W/status-$mode.ini" "$W/status.$mode.$r.log"; then
        log "status run $r ($mode): dispatch watch did not start"
        rec status "$mode" fail 1
        stop_pid "$WATCH_PID"
        continue
      fi
      local sse_pid='' poll_pid='' i
      if [ "$mode" = on ]; then
        curl -sN "http://$saddr/api/v1/events" >"$W/status.sse.$r" 2>/dev/null &
        sse_pid=$!
        PIDS+=("$sse_pid")
        if [ "${STATUS_POLL:-0}" = 1 ]; then
          (while :; do
            curl -s "http://$saddr/api/v1/status" >/dev/null
            curl -s "http://$saddr/metrics" >/dev/null
            sleep 0.5
          done) &
          poll_pid=$!
          PIDS+=("$poll_pid")
        fi
        for i in $(seq 100); do
          [ "$(status_clients "$saddr")" = 1 ] && break
          nap 0.05
        done
      fi
      local t0 done_n=0 last_ms perf_pid=''
      if [ -n "${PERF_DIR:-}" ]; then # a profile of the daemon, for `perf report`
        mkdir -p "$PERF_DIR"
        perf record -q -e cpu-clock -g -p "$WATCH_PID" -o "$PERF_DIR/status.$mode.$r.data" 2>/dev/null &
        perf_pid=$!
        nap 0.5
      fi
      t0=$EPOCHREALTIME
      mv "$src"/st-*.tgz "$drop"/
      for i in $(seq 1200); do # ≤ 120 s
        done_n=$(journal_count "$W/state/status-$mode")
        [ "$done_n" != - ] && [ "$done_n" -ge "$n_expected" ] && break
        nap 0.1
      done
      last_ms=$(sqlite3 -readonly "$W/state/status-$mode/journal.sqlite" "select max(updated_ms) from run where state in ('installed','uploaded')" 2>/dev/null || echo)
      if [ "$done_n" = - ] || [ "$done_n" -lt "$n_expected" ] || [ -z "$last_ms" ]; then
        log "status run $r ($mode): $done_n of $n_expected done within 120 s"
        rec status "$mode" fail 1
      else
        local took; took=$(calc "$last_ms / 1000 - $t0")
        local verified; verified=$(find "$RHOME/status" -name '*.installed' | wc -l)
        rec status "$mode" time "$took"
        rec status "$mode" verified "$verified"
        rec status "$mode" cpu "$(calc "$(proc_cpu_ticks "$WATCH_PID") / $TICK")"
        log "status run $r ($mode): $n_expected deliveries in $(fmt "$took") s ($verified markers)"
        [ "$mode" = on ] && rec status on events "$(grep -c '^id: ' "$W/status.sse.$r" || true)"
      fi
      [ -n "$perf_pid" ] && { kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null || true; }
      [ -n "$poll_pid" ] && stop_pid "$poll_pid"
      [ -n "$sse_pid" ] && stop_pid "$sse_pid"
      stop_pid "$WATCH_PID"
      wait "$WATCH_PID" 2>/dev/null || true
      mv "$drop"/st-*.tgz "$src"/
    done
  done
  [ "${STATUS_CALLGRIND:-0}" = 1 ] && status_callgrind "$src" "$drop" "$hosts_csv" "$saddr"
  local off on ratio
  off=$(med status off time)
  on=$(med status on time)
  ratio=-
  if [ -s "$W/res/status.on.time" ] && [ -s "$W/res/status.off.time" ]; then
    # the median of the per-run ratios (runs where both modes delivered)
    ratio=$(paste "$W/res/status.on.time" "$W/res/status.off.time" | awk '{ print $1 / $2 }' | sort -g |
      awk '{ v[NR] = $1 } END { if (NR) printf "%.3f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
  fi
  md "" "## 6. Status server overhead: $NFILES × $FILE_KB KiB renamed into a drop dir, ${#HOSTS[@]} hosts"
  md ""
  local clients="one client following \`/api/v1/events\` (\`curl -N\`)"
  [ "${STATUS_POLL:-0}" = 1 ] && clients="$clients and one reading \`/api/v1/status\` and \`/metrics\` every 0.5 s (a \`curl\` per request)"
  md "\`dispatch watch\` with \`status_listen = off\`, and on with $clients. *time* = from the rename into the drop dir to the last delivery the journal records as done. Modes in rotating order. Load average at start: $load0, at end: $(loadavg)."
  md ""
  md "| status server | median s | per run | daemon CPU s (median) | deliveries verified | events streamed |"
  md "| --- | ---: | --- | ---: | --- | --- |"
  md "| off | $(fmt "$off") | $(vals status off time) | $(fmt "$(med status off cpu)") | $(vals status off verified 0) | |"
  md "| on, no client | $(fmt "$(med status idle time)") | $(vals status idle time) | $(fmt "$(med status idle cpu)") | $(vals status idle verified 0) | |"
  md "| on, client(s) attached | $(fmt "$on") | $(vals status on time) | $(fmt "$(med status on cpu)") | $(vals status on verified 0) | $(vals status on events 0) |"
  [ "$(count status off fail)$(count status on fail)" != 00 ] && md "" "Failed runs: off $(count status off fail), on $(count status on fail)."
  md "" "| target | measured | met |" "| --- | ---: | --- |"
  md "| on within 5 % of off (median of per-run ratios) | $(fmt "$ratio")× | $(yesno "$ratio" '<=' 1.05) |"
  if [ -s "$W/res/status.off.instr" ]; then
    local i_off i_idle i_on
    i_off=$(head -1 "$W/res/status.off.instr"); i_idle=$(head -1 "$W/res/status.idle.instr"); i_on=$(head -1 "$W/res/status.on.instr")
    md "" "Instructions the daemon executed (valgrind --tool=callgrind, one run per mode, ${NFILES_CG:-50} files × ${#HOSTS[@]} hosts; repeatable where wall time is not):" ""
    md "| status server | instructions | ÷ off |" "| --- | ---: | ---: |"
    md "| off | $i_off | 1.000 |"
    md "| on, no client | $i_idle | $(calc "$i_idle / $i_off") |"
    md "| on, client attached | $i_on | $(calc "$i_on / $i_off") |"
    md "" "| target | measured | met |" "| --- | ---: | --- |"
    md "| daemon instructions with a client within 5 % of off | $(calc "$i_on / $i_off")× | $(yesno "$(calc "$i_on / $i_off")" '<=' 1.05) |"
  fi
}

# The same three modes once each with the daemon under callgrind, on the first NFILES_CG files:
# the instructions it executed, which do not depend on what else the machine is doing.
status_callgrind() { # src drop hosts_csv status_addr
  local src=$1 drop=$2 hosts_csv=$3 saddr=$4 mode n=${NFILES_CG:-50} i
  command -v valgrind >/dev/null || { log "status: no valgrind; instructions not counted"; return 0; }
  local expected=$((n * ${#HOSTS[@]})) files=()
  mapfile -t files < <(find "$src" -name 'st-*.tgz' | sort | head -n "$n")
  for mode in off idle on; do
    find "$RHOME/status" -mindepth 1 -delete
    rm -rf "$W/state/status-$mode"
    local listen=off; [ "$mode" != off ] && listen=$saddr
    dispatch_config "$W/status-$mode.ini" 'st-' "$hosts_csv" "~/status/{host}/%Y%m%d_%H%M%S" \
      'sha256sum {name} > {name}.installed' "$(printf 'watch = %s\nstatus_listen = %s' "$drop" "$listen")"
    local out=$W/status.cg.$mode
    WATCH_WRAP="valgrind --tool=callgrind --callgrind-out-file=$out.%p" WATCH_READY_POLLS=6000 \
      start_dispatch_watch "$W/status-$mode.ini" "$W/status.cg.$mode.log" || { log "status callgrind ($mode): did not start"; stop_pid "$WATCH_PID"; continue; }
    local sse_pid=''
    if [ "$mode" = on ]; then
      curl -sN "http://$saddr/api/v1/events" >"$W/status.cg.sse" 2>/dev/null &
      sse_pid=$!
      PIDS+=("$sse_pid")
      for i in $(seq 600); do [ "$(status_clients "$saddr")" = 1 ] && break; nap 0.1; done
    fi
    mv "${files[@]}" "$drop"/
    local done_n=0
    for i in $(seq 6000); do # ≤ 10 min
      done_n=$(journal_count "$W/state/status-$mode")
      [ "$done_n" != - ] && [ "$done_n" -ge "$expected" ] && break
      nap 0.1
    done
    [ -n "$sse_pid" ] && stop_pid "$sse_pid"
    kill -TERM "$WATCH_PID" 2>/dev/null || true
    for i in $(seq 1200); do kill -0 "$WATCH_PID" 2>/dev/null || break; nap 0.1; done
    local instr
    instr=$(cat "$out".* 2>/dev/null | awk '/^summary:/ { s += $2 } /^totals:/ { t += $2 } END { print (s ? s : t) }')
    log "status callgrind ($mode): $done_n of $expected done, $instr instructions"
    [ -n "$instr" ] && [ "$done_n" -ge "$expected" ] && rec status "$mode" instr "$instr"
    local f
    for f in "${files[@]}"; do mv "$drop/$(basename "$f")" "$src"/; done
  done
}

# ---------------------------------------------------------------- more hosts: one sshd per address (bandwidth, fanout)
start_sshd() { # tag address [netns] [extra sshd_config lines] -> its pid in SSHD_PID (also in PIDS)
  local tag=$1 addr=$2 ns=${3:-} extra=${4:-} cfg=$W/sshd.$1.conf
  sshd_conf "$tag" "$addr" >"$cfg"
  if [ -n "$extra" ]; then printf '%s\n' "$extra" >>"$cfg"; fi
  grep -q '^Subsystem' "$cfg" || echo "Subsystem sftp /usr/lib/openssh/sftp-server" >>"$cfg"
  /usr/sbin/sshd -t -f "$cfg" || die "sshd config $cfg invalid"
  (
    if [ -n "$CG" ]; then echo "$BASHPID" >"$CG/cgroup.procs"; fi
    if [ -n "$ns" ]; then
      exec ip netns exec "$ns" /usr/sbin/sshd -D -f "$cfg" -E "$W/sshd.$tag.log" # ip netns exec execs: $! is sshd
    fi
    exec /usr/sbin/sshd -D -f "$cfg" -E "$W/sshd.$tag.log"
  ) &
  SSHD_PID=$!
  PIDS+=("$SSHD_PID")
  echo "[$addr]:$PORT $(cut -d' ' -f1,2 "$W/host_ed25519.pub")" >>"$W/known_hosts"
}

sessions_gone() { # sshd-pid... : wait (≤ 5 s) until none of these sshd's has a session process left
  local i p busy
  for i in $(seq 250); do
    busy=0
    for p in "$@"; do if pgrep -P "$p" >/dev/null; then busy=1; break; fi; done
    [ $busy = 0 ] && return 0
    nap 0.02
  done
}

cg_cpu() { # CPU seconds used so far by every process in our cgroup (the sshd's and their sessions), or -
  local v
  if [ -z "$CG" ]; then
    printf -- -
  elif [ -f "$CG/cpuacct.usage" ]; then
    read -r v <"$CG/cpuacct.usage" && calc "$v / 1e9"
  else
    awk '$1 == "usage_usec" { printf "%.3f", $2 / 1e6 }' "$CG/cpu.stat"
  fi
}

cpu_snap() { # the machine's CPU time so far: total idle steal (ticks, all CPUs)
  awk '$1 == "cpu" { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $5 + $6, $9; exit }' /proc/stat
}
cpu_busy() { # snap-a snap-b -> "busy% steal%" of the machine in between
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); t = y[1] - x[1]; if (t <= 0) { print "- -"; exit }
    printf "%.0f %.0f\n", 100 * (1 - (y[2] - x[2]) / t), 100 * (y[3] - x[3]) / t }'
}

rate_bits() { # a tc rate (200mbit, 1gbit, 500kbit, 25mbps = bytes) -> bits/s
  awk -v r="$1" 'BEGIN { n = r + 0; u = tolower(r); sub(/^[0-9.]+/, "", u)
    m["bit"] = 1; m["kbit"] = 1e3; m["mbit"] = 1e6; m["gbit"] = 1e9; m["tbit"] = 1e12
    m["bps"] = 8; m["kbps"] = 8e3; m["mbps"] = 8e6; m["gbps"] = 8e9
    m["kibit"] = 1024; m["mibit"] = 1048576; m["gibit"] = 1073741824; m[""] = 1
    if (!(u in m)) { print "-"; exit } printf "%.0f", n * m[u] }'
}

# ================================================================= 7. bandwidth (capped links)
# BW_HOSTS hosts, each a network namespace dspbenchN with its own sshd, reached over a veth pair
# (root side dspbench-hN, BW_NET.(4N-3)/30; host side dspbench-nN, BW_NET.(4N-2)/30). The root
# side's egress (the direction of the upload) is shaped by tbf to BW_RATE. The bench user's home
# (the loop-mounted ext4) is the same in every namespace: each host writes under ~/bw/ADDRESS/.
BW_ADDRS=()
BW_SSHD=()
BW_NSS=()

bw_setup() {
  local i ns hv nv base a_root a_host
  # namespaces left by an earlier run that was killed (nothing runs in them any more) go first
  for ns in $(ip netns list | awk '$1 ~ /^dspbench[0-9]+$/ { print $1 }'); do
    if [ -n "$(ip netns pids "$ns" 2>/dev/null)" ]; then die "network namespace $ns is in use (another bench run?)"; fi
    log "bandwidth: deleting $ns, left by an earlier run"
    ip netns del "$ns"
  done
  if ip -4 addr show | grep -q " $BW_NET\."; then die "addresses $BW_NET.x are in use already"; fi
  for ((i = 1; i <= BW_HOSTS; i++)); do
    ns=dspbench$i hv=dspbench-h$i nv=dspbench-n$i base=$((4 * (i - 1)))
    a_root=$BW_NET.$((base + 1)) a_host=$BW_NET.$((base + 2))
    ip netns add "$ns" || die "ip netns add $ns failed"
    NETNS_MADE+=("$ns")
    BW_NSS+=("$ns")
    ip link add "$hv" type veth peer name "$nv" netns "$ns" || die "veth $hv/$nv failed"
    ip addr add "$a_root/30" dev "$hv"
    ip link set "$hv" up
    ip -n "$ns" addr add "$a_host/30" dev "$nv"
    ip -n "$ns" link set "$nv" up
    ip -n "$ns" link set lo up
    # the cap, towards the host; burst/latency as given (defaults 256kb / 50ms: a 1.5 MB queue)
    tc qdisc add dev "$hv" root tbf rate "$BW_RATE" burst "$BW_BURST" latency "$BW_LATENCY" || die "tc tbf on $hv failed"
    start_sshd "bw$i" "$a_host" "$ns"
    BW_SSHD+=("$SSHD_PID")
    BW_ADDRS+=("$a_host")
  done
  for ((i = 0; i < BW_HOSTS; i++)); do
    local k
    for k in $(seq 100); do ip netns exec "${BW_NSS[$i]}" ss -Hltn "src ${BW_ADDRS[$i]}:$PORT" | grep -q LISTEN && break; nap 0.05; done
    ssh "${SSH_OPTS[@]}" "${BW_ADDRS[$i]}" true || die "cannot log in to ${BW_ADDRS[$i]} (namespace ${BW_NSS[$i]}; see $W/sshd.bw$((i + 1)).log)"
  done
  log "bandwidth: $BW_HOSTS hosts in namespaces ${BW_NSS[*]}, links capped at $BW_RATE (tbf burst $BW_BURST latency $BW_LATENCY)"
}

bw_teardown() {
  local p ns keep=()
  for p in "${BW_SSHD[@]}"; do stop_pid "$p"; wait "$p" 2>/dev/null || true; done
  for ns in "${BW_NSS[@]}"; do ip netns del "$ns" 2>/dev/null || log "bandwidth: ip netns del $ns failed"; done
  for ns in "${NETNS_MADE[@]}"; do [[ " ${BW_NSS[*]} " == *" $ns "* ]] || keep+=("$ns"); done
  NETNS_MADE=("${keep[@]}")
  BW_SSHD=() BW_NSS=()
}

bw_probe() { # tag -> raw TCP (no SSH) over every link at once, BW_PROBE_MB each: BW_PROBE="agg_bits min_bits max_bits"
  local tag=$1 i p k bytes=$((BW_PROBE_MB * 1048576)) pport=$((PORT + 1)) py sinks=() senders=()
  py=$(command -v /usr/bin/python3 || command -v python3)
  for ((i = 0; i < BW_HOSTS; i++)); do
    rm -f "$W/bw.probe.$tag.$i"
    ip netns exec "${BW_NSS[$i]}" "$py" "$HERE/tcpsink.py" "${BW_ADDRS[$i]}" "$pport" "$W/bw.probe.$tag.$i" >"$W/bw.sink.$tag.$i.log" 2>&1 &
    sinks+=($!)
    PIDS+=($!)
  done
  for ((i = 0; i < BW_HOSTS; i++)); do
    for k in $(seq 200); do grep -q listening "$W/bw.sink.$tag.$i.log" 2>/dev/null && break; nap 0.025; done
  done
  for ((i = 0; i < BW_HOSTS; i++)); do
    (head -c "$bytes" /dev/zero >"/dev/tcp/${BW_ADDRS[$i]}/$pport") 2>>"$W/bw.sink.$tag.$i.log" &
    senders+=($!)
  done
  for p in "${senders[@]}"; do wait "$p" || true; done
  for p in "${sinks[@]}"; do
    for k in $(seq 200); do kill -0 "$p" 2>/dev/null || break; nap 0.05; done
    stop_pid "$p"
    wait "$p" 2>/dev/null || true
  done
  # per link: bytes / (last - first byte); all: every byte / (last byte anywhere - first byte anywhere)
  BW_PROBE=$(cat "$W"/bw.probe."$tag".* 2>/dev/null | awk -v n="$BW_HOSTS" '
    { b += $1; r = ($3 > $2) ? 8 * $1 / ($3 - $2) : 0; if (NR == 1 || r < lo) lo = r; if (r > hi) hi = r
      if (NR == 1 || $2 < f) f = $2; if ($3 > l) l = $3 }
    END { if (NR != n || l <= f) { print "- - -"; exit } printf "%.0f %.0f %.0f\n", 8 * b / (l - f), lo, hi }')
  log "bandwidth: raw TCP probe ($tag), $BW_PROBE_MB MiB per link at once: $(awk -v v="$BW_PROBE" 'BEGIN { split(v, a, " "); printf "all %.1f Mbit/s, per link %.1f-%.1f", a[1] / 1e6, a[2] / 1e6, a[3] / 1e6 }')"
}

bw_verify() { # name sha256 size -> hosts whose landed file has the sha256 and whose install marker is right
  local name=$1 want=$2 size=$3 a m first got ok=0
  : >"$W/bw.landed"
  for a in "${BW_ADDRS[@]}"; do
    m=$(find "$RHOME/bw/$a" -name "$name.installed" 2>/dev/null | head -1)
    [ -n "$m" ] && printf '%s\0' "${m%.installed}" >>"$W/bw.landed"
  done
  # the sha256 of every landed copy, two at a time (untimed)
  xargs -0 -r -P 2 -n 1 sha256sum <"$W/bw.landed" >"$W/bw.landed.sha" 2>/dev/null || true
  while read -r got m; do
    first=
    read -r first _ <"$m.installed" || true
    if [ "$got" = "$want" ] && { [ "$first" = "$want" ] || [ "$first" = "$size" ]; }; then ok=$((ok + 1)); fi
  done <"$W/bw.landed.sha"
  echo "$ok"
}

wl_bandwidth() {
  local size=$((BW_MB * 1048576)) name=bw-${BW_MB}M.tgz
  local f=$W/data/$name cap_bits cap_total install_cmd
  cap_bits=$(rate_bits "$BW_RATE")
  [ "$cap_bits" != - ] || die "BW_RATE=$BW_RATE: unknown unit"
  cap_total=$((cap_bits * BW_HOSTS))
  case $BW_INSTALL in
    wc) install_cmd='wc -c {name} > {name}.installed' ;;
    sha256) install_cmd='sha256sum {name} > {name}.installed' ;;
  esac
  log "bandwidth: making a $BW_MB MiB random file"
  head -c "$size" /dev/urandom >"$f"
  local want; want=$(sha256sum <"$f" | cut -d' ' -f1)
  bw_setup
  local probe_before probe_after
  bw_probe before
  probe_before=$BW_PROBE
  local hosts_csv; hosts_csv=$(printf '%s, ' "${BW_ADDRS[@]}"); hosts_csv=${hosts_csv%, }
  # shellcheck disable=SC2088 # `~` is for dispatch to resolve on the host
  dispatch_config "$W/bw.ini" 'bw-' "$hosts_csv" "~/bw/{host}/%Y%m%d_%H%M%S" "$install_cmd"
  install -d -o "$BUSER" "$RHOME/bw"
  local load0; load0=$(loadavg)
  local r tool
  for ((r = 1; r <= RUNS; r++)); do
    for tool in $(rotate $((r - 1)) dispatch scp); do
      find "$RHOME/bw" -mindepth 1 -delete
      rm -rf "$W/state/bw"
      sync
      local t0 t1 rc=0 out=$W/bw.$tool.$r stamp s0 s1 c0 c1 secs ok
      printf -v stamp '%(%Y%m%d_%H%M%S)T' -1
      c0=$(cg_cpu)
      s0=$(cpu_snap)
      ctimes a
      t0=$EPOCHREALTIME
      case $tool in
        dispatch) /usr/bin/time -v -o "$out.time" "$DISPATCH_BIN" -c "$W/bw.ini" --json "$f" >"$out.out" 2>"$out.err" || rc=$? ;;
        scp)
          if [ "$BW_INSTALL" = sha256 ]; then
            PH_HOSTS=BW_ADDRS perhost_to bw SSH_OPTS "$stamp" "$f" >"$out.out" 2>"$out.err" || rc=$?
          else
            PH_HOSTS=BW_ADDRS bw_perhost_wc "$stamp" "$f" >"$out.out" 2>"$out.err" || rc=$?
          fi
          ;;
      esac
      t1=$EPOCHREALTIME
      ctimes b
      s1=$(cpu_snap)
      sessions_gone "${BW_SSHD[@]}"
      c1=$(cg_cpu)
      secs=$(calc "$t1 - $t0")
      ok=$(bw_verify "$name" "$want" "$size")
      local busy steal bits pct ccpu
      read -r busy steal <<<"$(cpu_busy "$s0" "$s1")"
      bits=$(calc "$BW_HOSTS * $size * 8 / $secs")
      pct=$(calc "100 * $bits / $cap_total")
      ccpu=$(cdelta a b)
      rec bw "$tool" verified "$ok"
      rec bw "$tool" rc "$rc"
      if [ "$ok" = "$BW_HOSTS" ]; then
        rec bw "$tool" secs "$secs"
        rec bw "$tool" mbits "$(calc "$bits / 1e6")"
        rec bw "$tool" pct "$pct"
        rec bw "$tool" ccpu "$ccpu"
        rec bw "$tool" cores "$(calc "$ccpu / $secs")"
        rec bw "$tool" busy "$busy"
        rec bw "$tool" steal "$steal"
        [ "$c0" != - ] && rec bw "$tool" scpu "$(calc "$c1 - $c0")"
        [ -f "$out.time" ] && rec bw "$tool" rss "$(tv_rss_mb "$out.time")"
        if [ "$tool" = dispatch ]; then
          # the transfer phase, from dispatch's events: first upload started -> last one in place
          local span spread
          read -r span spread <<<"$(json_span "$out.out" uploading uploaded)"
          if [ "$span" != - ]; then
            rec bw dispatch xfer "$span"
            rec bw dispatch xpct "$(calc "100 * $BW_HOSTS * $size * 8 / $span / $cap_total")"
            rec bw dispatch spread "$spread"
          fi
        fi
        echo "$secs" >"$W/bw.cur.$tool"
        log "bandwidth run $r: $tool $(fmt "$secs") s = $(fmt "$(calc "$bits / 1e6")" 0) Mbit/s ($(fmt "$pct" 1) % of $BW_HOSTS × $BW_RATE), client CPU $(fmt "$ccpu") s, machine busy $busy % (steal $steal %), $ok/$BW_HOSTS verified"
      else
        rec bw "$tool" fail 1
        rm -f "$W/bw.cur.$tool"
        log "bandwidth run $r: $tool FAILED (exit $rc, $ok/$BW_HOSTS verified): $(tail -c 400 "$out.err" | tr '\n' ' ')"
      fi
    done
    if [ -f "$W/bw.cur.dispatch" ] && [ -f "$W/bw.cur.scp" ]; then
      rec bw scp ratio "$(calc "$(cat "$W/bw.cur.dispatch") / $(cat "$W/bw.cur.scp")")"
    fi
    rm -f "$W"/bw.cur.*
  done
  find "$RHOME/bw" -mindepth 1 -delete
  bw_probe after
  probe_after=$BW_PROBE
  bw_teardown
  rm -f "$f"
  local p_agg p_lo p_hi q_agg
  read -r p_agg p_lo p_hi <<<"$probe_before"
  read -r q_agg _ <<<"$probe_after"
  local raw_cap=$p_agg # the capacity really there: the lower of the two probes
  if [ "$q_agg" != - ] && { [ "$p_agg" = - ] || [ "$q_agg" -lt "$p_agg" ]; }; then raw_cap=$q_agg; fi
  local dpct dmb
  dpct=$(med bw dispatch pct)
  dmb=$(med bw dispatch mbits)
  md ""
  md "## 7. Bandwidth: one $BW_MB MiB package to $BW_HOSTS hosts, each link capped at $BW_RATE"
  md ""
  md "Each host is a network namespace (\`dspbench1\`…\`dspbench$BW_HOSTS\`) with its own sshd, reached over its own veth pair and /30 ($BW_NET.0/24); the root side's egress — the direction of the upload — is shaped by \`tc qdisc … tbf rate $BW_RATE burst $BW_BURST latency $BW_LATENCY\` (this kernel has no netem), so the capacity is $BW_HOSTS × $BW_RATE = $(fmt "$(calc "$cap_total / 1e6")" 0) Mbit/s in all. tbf counts whole frames (Ethernet + IP + TCP headers): a TCP stream's payload can use at most ~1448/1514 = 95.6 % of it. **Measured capacity**: raw TCP, no SSH (\`head -c | /dev/tcp\` into \`bench/tcpsink.py\` in each namespace), $BW_PROBE_MB MiB over every link at once, before the runs: $(fmt "$(calc "${p_agg/-/0} / 1e6")" 0) Mbit/s in all ($(fmt "$(calc "100 * ${p_agg/-/0} / $cap_total")" 1) % of nominal; per link $(fmt "$(calc "${p_lo/-/0} / 1e6")" 1)–$(fmt "$(calc "${p_hi/-/0} / 1e6")" 1) Mbit/s); after the runs: $(fmt "$(calc "${q_agg/-/0} / 1e6")" 0) Mbit/s."
  md ""
  md "Install command: \`$install_cmd\`$([ "$BW_INSTALL" = wc ] && echo " (cheap on purpose: every \"host\" here shares the client's 2 cores, and \`sha256sum\` of $BW_HOSTS × $BW_MB MiB would cost ~$(fmt "$(calc "$BW_HOSTS * $BW_MB / 200")" 0) CPU s on them — time a real host spends on its own CPU; \`BW_INSTALL=sha256\` measures it that way)"). *verified* = hosts whose landed copy has the local sha256 (hashed by the bench after the run, untimed) and whose install marker is right. The peer \`scp\` = per host, in parallel: \`ssh mkdir\` + one \`scp\` + one \`ssh\` running the install (§2's (c)). dispatch: one \`dispatch -c CONFIG FILE\`, the $BW_HOSTS hosts in one section, jobs $D_JOBS, $D_SESSIONS sessions per host. *aggregate* = $BW_HOSTS × $BW_MB MiB × 8 / wall time (the whole command: connect, upload, install). *client CPU* = user+sys of the command and its children; ÷ wall = cores used (the machine has $(nproc)); *machine busy* = all CPUs, from /proc/stat (steal included in busy). Server CPU = the sshd's and their sessions (cgroup). Load average at start: $load0, at end: $(loadavg)."
  md ""
  md "| tool | wall s (median) | wall s per run | aggregate Mbit/s (median) | % of $BW_HOSTS × $BW_RATE | % of measured raw TCP | verified (per run) | client CPU s | client cores (CPU ÷ wall) | machine busy % (steal %) | server CPU s | dispatch ÷ tool, time |"
  md "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |"
  for tool in dispatch scp; do
    local label=$tool ratio=1 mb
    # shellcheck disable=SC2016 # backquotes are Markdown
    case $tool in
      dispatch) label='`dispatch`' ;;
      scp) label='per host `ssh mkdir` + `scp` + `ssh install`, in parallel'; ratio=$(med bw scp ratio) ;;
    esac
    mb=$(med bw "$tool" mbits)
    local rawpct=-
    [ "$raw_cap" != - ] && [ "$mb" != - ] && rawpct=$(calc "100 * $mb * 1e6 / $raw_cap")
    md "| $label | $(fmt "$(med bw "$tool" secs)") | $(vals bw "$tool" secs) | $(fmt "$mb" 0) | $(fmt "$(med bw "$tool" pct)" 1) | $(fmt "$rawpct" 1) | $(vals bw "$tool" verified 0) | $(fmt "$(med bw "$tool" ccpu)") | $(fmt "$(med bw "$tool" cores)") | $(vals bw "$tool" busy 0) ($(vals bw "$tool" steal 0)) | $(fmt "$(med bw "$tool" scpu)") | $(fmt "$ratio")× |"
  done
  [ "$(count bw dispatch fail)$(count bw scp fail)" != 00 ] && md "" "Failed runs (not in the medians): dispatch $(count bw dispatch fail), scp $(count bw scp fail); exit codes per run: dispatch $(vals bw dispatch rc 0), scp $(vals bw scp rc 0)."
  local busy_med nbusy
  busy_med=$(med bw dispatch busy)
  nbusy=$(awk '$1 >= 90 { n++ } END { print n + 0 }' "$W/res/bw.dispatch.busy" 2>/dev/null || echo 0)
  md ""
  md "dispatch's client used $(fmt "$(med bw dispatch cores)") cores (median) of $(nproc), peak RSS $(fmt "$(med bw dispatch rss)" 1) MB. The machine was $(vals bw dispatch busy 0) % busy during its runs (median $(fmt "$busy_med" 0) %; the client, every host's sshd and the kernel's veth/tbf/TCP work share the $(nproc) cores): $nbusy of $(count bw dispatch busy) runs at ≥ 90 %, i.e. CPU bound — $(awk -v b="$busy_med" 'BEGIN { if (b == "-") print "n/a"; else if (b >= 90) print "**the median run was CPU bound**, not link bound"; else print "the median run was not CPU bound (the links were the limit)" }')."
  md ""
  md "Transfer phase of dispatch (from its \`--json\` events: the first \`uploading\` to the last \`uploaded\`, i.e. without connecting, login and install): $(fmt "$(med bw dispatch xfer)") s median (per run $(vals bw dispatch xfer)) = $(fmt "$(med bw dispatch xpct)" 1) % of $BW_HOSTS × $BW_RATE; the hosts finished within $(vals bw dispatch spread) s of each other."
  md ""
  md "| target | measured | met |"
  md "| --- | ---: | --- |"
  md "| Issue target (W6): dispatch ≥ 90 % of the capacity ($BW_HOSTS × $BW_RATE), median | $(fmt "$dpct" 1) % ($(fmt "$dmb" 0) Mbit/s) | $(yesno "$dpct" '>=' 90) |"
  [ "$raw_cap" != - ] && md "| (for reference) dispatch ÷ the measured raw-TCP capacity | $(fmt "$(calc "100 * ${dmb/-/0} * 1e6 / $raw_cap")" 1) % | |"
}

json_span() { # dispatch --json output, first-event, last-event -> "span spread" in s: from the first
  # first-event to the last last-event, and between the first and the last last-event
  awk -v a="$2" -v b="$3" '
    function ts(line, s, p, t, d) {
      s = line; sub(/.*"at":"/, "", s); sub(/".*/, "", s) # 2026-12-04T21:04:05.483Z
      split(s, p, "T"); split(p[2], t, ":"); sub(/Z$/, "", t[3]); split(p[1], d, "-")
      return d[3] * 86400 + t[1] * 3600 + t[2] * 60 + t[3]
    }
    index($0, "\"event\":\"" a "\"") { v = ts($0); if (!n1++ || v < f) f = v }
    index($0, "\"event\":\"" b "\"") { v = ts($0); if (!n2++ || v < e1) e1 = v; if (v > e2) e2 = v }
    END { if (n1 && n2) printf "%.3f %.3f\n", e2 - f, e2 - e1; else print "- -" }' "$1"
}

bw_perhost_wc() { # stamp file ; perhost_to with the bandwidth workload's cheap install (wc -c)
  local stamp=$1 f=$2 h jobs=() name=${2##*/}
  local -n ph_hosts=${PH_HOSTS:-HOSTS}
  for h in "${ph_hosts[@]}"; do
    # shellcheck disable=SC2029 # expanded here on purpose
    (
      d=$RHOME/bw/$h/$stamp
      ssh "${SSH_OPTS[@]}" "$h" "mkdir -p $d" &&
        scp -q "${SSH_OPTS[@]}" "$f" "$h:$d/" &&
        ssh "${SSH_OPTS[@]}" "$h" "cd $d && wc -c $name > $name.installed"
    ) &
    jobs+=($!)
  done
  for f in "${jobs[@]}"; do wait "$f" || true; done
}

# ================================================================= 8. fan-out (64 hosts)
# FAN_HOSTS sshd's on 127.0.1.1-N (one per address, port PORT, the bench user). All share the
# user's home, so each host's session gets BENCH_HOST=ADDRESS (sshd SetEnv) and its SFTP server
# starts in ~/fanout/ADDRESS (sftp-server -d): a relative path means the host's own directory for
# tools (pssh) that send the same command and destination to every host.
FAN_ADDRS=()
FAN_SSHD=()

fan_setup() {
  local i a k
  install -d -o "$BUSER" "$RHOME/fanout"
  for ((i = 1; i <= FAN_HOSTS; i++)); do
    a=$FAN_NET.$i
    install -d -o "$BUSER" "$RHOME/fanout/$a"
    start_sshd "fan$i" "$a" "" "$(printf 'SetEnv BENCH_HOST=%s\nSubsystem sftp /usr/lib/openssh/sftp-server -d %s' "$a" "$RHOME/fanout/$a")"
    FAN_SSHD+=("$SSHD_PID")
    FAN_ADDRS+=("$a")
  done
  for k in $(seq 200); do
    [ "$(ss -Hltn "sport = :$PORT" | awk -v n="$FAN_NET." 'index($4, n) == 1' | wc -l)" -ge "$FAN_HOSTS" ] && break
    nap 0.05
  done
  for a in "${FAN_ADDRS[@]}"; do
    [ "$(ssh "${SSH_OPTS[@]}" "$a" 'echo $BENCH_HOST')" = "$a" ] || die "cannot log in to $a:$PORT, or BENCH_HOST is wrong (see $W/sshd.fan*.log)"
  done
  printf '%s\n' "${FAN_ADDRS[@]}" >"$W/fan.hosts"
  log "fanout: $FAN_HOSTS hosts up on $FAN_NET.1-$FAN_HOSTS:$PORT"
}

fan_teardown() {
  local p
  for p in "${FAN_SSHD[@]}"; do stop_pid "$p"; done
  for p in "${FAN_SSHD[@]}"; do wait "$p" 2>/dev/null || true; done
  FAN_SSHD=()
}

write_ansible() { # the inventory, ansible.cfg and the playbook: copy + shell, as an operator writes them
  local a
  mkdir -p "$W/ansible/cp" "$W/ansible/local"
  {
    echo "[fan]"
    printf '%s\n' "${FAN_ADDRS[@]}"
    echo
    echo "[fan:vars]"
    echo "ansible_port=$PORT"
    echo "ansible_user=$BUSER"
    echo "ansible_ssh_private_key_file=$W/client_ed25519"
    echo "ansible_ssh_common_args=-F /dev/null -o UserKnownHostsFile=$W/known_hosts -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes"
    echo "ansible_python_interpreter=/usr/bin/python3"
  } >"$W/ansible/inventory"
  cat >"$W/ansible/ansible.cfg" <<EOF
[defaults]
inventory = $W/ansible/inventory
forks = $FAN_HOSTS
host_key_checking = True
gathering = explicit
retry_files_enabled = False
local_tmp = $W/ansible/local
interpreter_python = /usr/bin/python3

[ssh_connection]
# Ansible's default ssh_args, ControlPersist as FANOUT_ANSIBLE_PERSIST
ssh_args = -C -o ControlMaster=auto -o ControlPersist=$FANOUT_ANSIBLE_PERSIST
control_path_dir = $W/ansible/cp
EOF
  cat >"$W/ansible/fanout.yml" <<'EOF'
- hosts: fan
  gather_facts: false
  tasks:
    - name: upload the package
      ansible.builtin.copy:
        src: "{{ pkg }}"
        dest: "{{ base }}/{{ inventory_hostname }}/{{ stamp }}/"
        mode: "0644"
    - name: install it
      ansible.builtin.shell: "cd {{ base }}/{{ inventory_hostname }}/{{ stamp }} && sha256sum {{ pkg | basename }} > {{ pkg | basename }}.installed"
EOF
}

run_pssh() { # stamp file ; parallel-ssh mkdir, parallel-scp, parallel-ssh install: 64 at once
  local stamp=$1 f=$2 name=${2##*/}
  local o=(-p "$FAN_HOSTS" -h "$W/fan.hosts" -x "${SSH_OPTS[*]}")
  # shellcheck disable=SC2016 # $BENCH_HOST is expanded on each host
  parallel-ssh "${o[@]}" "mkdir -p fanout/\$BENCH_HOST/$stamp" &&
    parallel-scp "${o[@]}" "$f" "$stamp/" &&
    parallel-ssh "${o[@]}" "cd fanout/\$BENCH_HOST/$stamp && sha256sum $name > $name.installed"
}

run_ansible() { # stamp file
  LC_ALL=C.UTF-8 ANSIBLE_CONFIG=$W/ansible/ansible.cfg ANSIBLE_HOME=$W/ansible ANSIBLE_NOCOLOR=1 \
    ansible-playbook -e "pkg=$2" -e "stamp=$1" -e "base=$RHOME/fanout" "$W/ansible/fanout.yml"
}

wl_fanout() {
  local name=fan-${FAN_KB}k.tgz f n_expected=$FAN_HOSTS
  f=$W/data/$name
  head -c $((FAN_KB * 1024)) /dev/urandom >"$f"
  (cd "$W/data" && sha256sum "$name") >"$W/data/fan.sha256"
  fan_setup
  local hosts_csv; hosts_csv=$(printf '%s, ' "${FAN_ADDRS[@]}"); hosts_csv=${hosts_csv%, }
  local j jobs_list=() primary
  for j in $FANOUT_JOBS; do
    [[ $j =~ ^[1-9][0-9]*$ ]] || die "FANOUT_JOBS: '$j' is not a number"
    # absolute: dispatch finds `~` by SFTP, which here starts in the host's own directory
    dispatch_config "$W/fan-j$j.ini" 'fan-' "$hosts_csv" "$RHOME/fanout/{host}/%Y%m%d_%H%M%S" 'sha256sum {name} > {name}.installed'
    sed -i "s/^jobs = .*/jobs = $j/" "$W/fan-j$j.ini"
    jobs_list+=("dispatch-j$j")
  done
  primary=${jobs_list[0]}
  local peers=()
  if [ "$HAVE_PSSH" = 1 ]; then peers+=(pssh); fi
  if [ "$HAVE_ANSIBLE" = 1 ]; then peers+=(ansible); write_ansible; fi
  local keep_dir=${FANOUT_KEEP_DIR:-/tmp/dsp-bench-fanout-kept.$$}
  local load0; load0=$(loadavg)
  local r tool failed_runs=()
  for ((r = 1; r <= FANOUT_RUNS; r++)); do
    local tools=("${jobs_list[@]}")
    [ "$r" -le "$FANOUT_PEER_RUNS" ] && tools+=("${peers[@]}")
    for tool in $(rotate $((r - 1)) "${tools[@]}"); do
      find "$RHOME/fanout" -mindepth 2 -delete
      rm -rf "$W/state/fan-j"*
      sync
      local t0 t1 rc=0 out=$W/fan.$tool.$r stamp secs ok
      printf -v stamp '%(%Y%m%d_%H%M%S)T' -1
      ctimes a
      t0=$EPOCHREALTIME
      case $tool in
        dispatch-j*) /usr/bin/time -v -o "$out.time" "$DISPATCH_BIN" -c "$W/fan-j${tool#dispatch-j}.ini" -v --json "$f" >"$out.out" 2>"$out.err" || rc=$? ;;
        pssh) run_pssh "$stamp" "$f" >"$out.out" 2>"$out.err" || rc=$? ;;
        ansible) run_ansible "$stamp" "$f" >"$out.out" 2>"$out.err" || rc=$? ;;
      esac
      t1=$EPOCHREALTIME
      ctimes b
      secs=$(calc "$t1 - $t0")
      [ "$tool" = ansible ] && close_masters "$W/ansible/cp" # untimed: the next run starts without masters
      ok=$(verify_installed "$RHOME/fanout" "$W/data/fan.sha256")
      rec fan "$tool" secs "$secs"
      rec fan "$tool" verified "$ok"
      rec fan "$tool" rc "$rc"
      rec fan "$tool" ccpu "$(cdelta a b)"
      echo "$secs $ok" >"$W/fan.cur.$tool"
      local extra=
      if [[ $tool == dispatch-j* ]]; then
        local okl; okl=$(grep -c '"ok":true' "$out.out" || true)
        extra=", $okl ok results"
        if [ "$ok" != "$n_expected" ] || [ "$rc" != 0 ]; then
          # keep everything of a run that lost hosts, and the hosts' sshd logs
          mkdir -p "$keep_dir/run$r-$tool"
          cp "$out".* "$W/fan-j${tool#dispatch-j}.ini" "$keep_dir/run$r-$tool/"
          find "$RHOME/fanout" -name '*.installed' >"$keep_dir/run$r-$tool/installed.list"
          failed_runs+=("run $r $tool: $ok/$n_expected verified, exit $rc")
          rec fan "$tool" lost 1
          log "fanout run $r: $tool LOST HOSTS ($ok/$n_expected, exit $rc); kept in $keep_dir/run$r-$tool"
        fi
      fi
      log "fanout run $r: $tool $(fmt "$secs") s, $ok/$n_expected installs verified (exit $rc$extra)"
    done
    local d_secs d_ok p_secs p_ok
    read -r d_secs d_ok <"$W/fan.cur.$primary"
    if [ "$d_ok" = "$n_expected" ]; then
      for tool in "${jobs_list[@]:1}" "${peers[@]}"; do
        [ -f "$W/fan.cur.$tool" ] || continue
        read -r p_secs p_ok <"$W/fan.cur.$tool"
        [ "$p_ok" = "$n_expected" ] && rec fan "$tool" ratio "$(calc "$d_secs / $p_secs")"
      done
    fi
    rm -f "$W"/fan.cur.*
  done
  find "$RHOME/fanout" -mindepth 2 -delete
  if [ ${#failed_runs[@]} -gt 0 ]; then
    mkdir -p "$keep_dir/sshd-logs"
    cp "$W"/sshd.fan*.log "$keep_dir/sshd-logs/" 2>/dev/null || true
  fi
  fan_teardown
  local pssh_v ansible_v
  pssh_v=$(parallel-ssh --version 2>&1 | head -1 || true)
  ansible_v=$(LC_ALL=C.UTF-8 ansible-playbook --version 2>/dev/null | head -1 || true)
  md ""
  md "## 8. Fan-out: one $FAN_KB KiB package to $FAN_HOSTS hosts, installed"
  md ""
  md "$FAN_HOSTS sshd's on $FAN_NET.1–$FAN_NET.$FAN_HOSTS:$PORT (one per address, sshd defaults as above, the bench user; each session gets \`BENCH_HOST=ADDRESS\` and its SFTP server starts in \`~/fanout/ADDRESS\`, so one command line serves every host). Install command everywhere: \`sha256sum NAME > NAME.installed\`; *verified* = hosts whose marker holds the file's sha256 (of $n_expected). dispatch: one \`dispatch -c CONFIG -v --json FILE\`, all $FAN_HOSTS hosts in one section, \`max_sessions_per_host = $D_SESSIONS\`, \`jobs\` as shown (its default is 8). Peers, with the same key / known_hosts / \`StrictHostKeyChecking=yes\` options: *pssh* (pssh $pssh_v) = \`parallel-ssh -p $FAN_HOSTS mkdir\` + \`parallel-scp -p $FAN_HOSTS\` + \`parallel-ssh -p $FAN_HOSTS install\`; *Ansible* ($ansible_v) = \`ansible-playbook\`, \`forks = $FAN_HOSTS\`, host key checking on, \`gather_facts: false\`, the \`copy\` module then the \`shell\` module, Ansible's default ssh_args (\`-C -o ControlMaster=auto -o ControlPersist=$FANOUT_ANSIBLE_PERSIST\`: the two tasks share one connection per host), pipelining off (the default); the masters are closed after each run (untimed), so each run starts cold, as a deploy does more than $FANOUT_ANSIBLE_PERSIST after the last. dispatch runs $FANOUT_RUNS times, the peers in the first $FANOUT_PEER_RUNS of them; tools in rotating order; ratios = dispatch (\`jobs\` ${primary#dispatch-j}) ÷ tool, time, per run (runs where both verified $n_expected/$n_expected), then the median. Client CPU = user+sys of the command and its children. Load average at start: $load0, at end: $(loadavg)."
  md ""
  md "| tool | wall s (median) | wall s per run | verified (per run) | exit code (per run) | client CPU s (median) | dispatch (jobs ${primary#dispatch-j}) ÷ tool, time |"
  md "| --- | ---: | --- | --- | --- | ---: | ---: |"
  for tool in "${jobs_list[@]}" "${peers[@]}"; do
    local label=$tool ratio=-
    case $tool in
      dispatch-j*) label="\`dispatch\`, jobs ${tool#dispatch-j}" ;;
      pssh) label="pssh (\`parallel-ssh\` + \`parallel-scp\`)" ;;
      ansible) label="Ansible (\`copy\` + \`shell\`, forks $FAN_HOSTS)" ;;
    esac
    [ "$tool" = "$primary" ] && ratio=1
    [ -s "$W/res/fan.$tool.ratio" ] && ratio=$(med fan "$tool" ratio)
    md "| $label | $(fmt "$(med fan "$tool" secs)") | $(vals fan "$tool" secs) | $(vals fan "$tool" verified 0) | $(vals fan "$tool" rc 0) | $(fmt "$(med fan "$tool" ccpu)") | $(fmt "$ratio")× |"
  done
  [ ${#peers[@]} -lt 2 ] && md "" "Peers not measured: $(for p in pssh ansible; do [[ " ${peers[*]} " == *" $p "* ]] || printf '%s ' "$p"; done)(not installed or not in FANOUT_PEERS)."
  if [ ${#failed_runs[@]} -gt 0 ]; then
    md "" "dispatch runs that lost hosts: ${failed_runs[*]}. Their output, log (\`-v\`), JSON results and the hosts' sshd logs were kept in \`$keep_dir\`."
  fi
  local rp ra all_ok nruns bad
  rp=$(med fan pssh ratio)
  ra=$(med fan ansible ratio)
  nruns=$(count fan "$primary" verified)
  bad=$(count fan "$primary" lost)
  if [ "$bad" != 0 ]; then
    all_ok="no ($bad of $nruns runs lost hosts or exited non-zero)"
  elif [ "$nruns" -ge 10 ]; then
    all_ok=yes
  else
    all_ok="yes in $nruns runs (the issue asks for 10)"
  fi
  md ""
  md "| target | measured | met |"
  md "| --- | ---: | --- |"
  md "| Issue target (W7): dispatch ≤ 0.15× the time of pssh (median of per-run ratios) | $(fmt "$rp")× | $(yesno "$rp" '<=' 0.15) |"
  md "| Issue target (W7): dispatch ≤ 0.1× the time of Ansible | $(fmt "$ra")× | $(yesno "$ra" '<=' 0.1) |"
  md "| Issue target (W7): $n_expected/$n_expected installed in every run (dispatch, jobs ${primary#dispatch-j}; $(count fan "$primary" verified) runs) | $(vals fan "$primary" verified 0) | $all_ok |"
}

# ================================================================= main
setup_hosts
START_LOAD=$(loadavg)
START_DATE=$(date '+%Y-%m-%d %H:%M %Z')
for w in "${WORKLOADS[@]}"; do
  log "=== $w"
  "wl_$w"
done

mkdir -p "$RESULTS_DIR"
OUT=$RESULTS_DIR/$(date +%Y-%m-%d_%H%M).md
{
  echo "# dispatch benchmark, $START_DATE"
  echo
  cmd_env="RUNS=$RUNS SIZE_MB=$SIZE_MB NFILES=$NFILES FILE_KB=$FILE_KB SCALE_FILES=$SCALE_FILES"
  if wants bandwidth; then cmd_env+=" BW_MB=$BW_MB BW_HOSTS=$BW_HOSTS BW_RATE=$BW_RATE BW_BURST=$BW_BURST BW_LATENCY=$BW_LATENCY BW_INSTALL=$BW_INSTALL"; fi
  if wants fanout; then cmd_env+=" FANOUT_HOSTS=$FAN_HOSTS FANOUT_KB=$FAN_KB FANOUT_RUNS=$FANOUT_RUNS FANOUT_PEER_RUNS=$FANOUT_PEER_RUNS FANOUT_JOBS=\"$FANOUT_JOBS\""; fi
  echo "Command: \`$cmd_env bench/run.sh ${WORKLOADS[*]}\`"
  echo
  echo "| | |"
  echo "| --- | --- |"
  echo "| machine | $(nproc) CPUs, $(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), kernel $(uname -r) |"
  echo "| OpenSSH | $(ssh -V 2>&1) |"
  echo "| dispatch | $("$DISPATCH_BIN" --version 2>/dev/null), binary sha256 $DISPATCH_SHA…, $DISPATCH_DESC |"
  echo "| hosts | ${#HOSTS[*]} sshd on ${HOSTS[*]}:$PORT, sshd defaults except keys/paths (MaxStartups 10:30:100, MaxSessions 10, UsePAM no) |"
  echo "| hosts' file system | $TARGET_DESC |"
  echo "| load average | start $START_LOAD, end $(loadavg) (other work was running on the machine) |"
  echo "| runs | $RUNS per workload, tools in rotating order; medians; ratios = median of per-run ratios |"
  cat "$W/report.md"
} >"$OUT"
cat "$OUT"
log "results written to $OUT"
