#!/.ldt/busybox sh
# shellcheck shell=sh
#
# PID 1 of an app image that has no init system (distroless, alpine, debian:…-slim…): does what
# docker's runtime does around `docker run IMAGE`, then runs the image's app and powers off.
#
# The kernel starts it with init=/.ldt/init; its interpreter is the static busybox at
# /.ldt/busybox, and every command below is that busybox's applet, so the image needs no shell,
# no libc and no tools. The host writes /.ldt/app.conf (pipeline/app.py app_init_config):
#   LDT_UID, LDT_GID      the ids the app runs as
#   LDT_CWD               its working directory
#   LDT_HOSTNAME          the hostname
#   LDT_STOP_SIGNAL       the number of the signal a SIGTERM to us becomes (docker stop)
#   set -- NAME=value… EXE ARG…   the arguments of `env -i`: the app's environment and argv
#
# When the app ends: the line "ldt-app-exit: N" on the console (N: its exit code, or 128 + the
# signal that killed it), then sync and power off; the host reads N from the console.
#
# Test switches (environment): LDT_INIT_NO_SYSTEM=1 skips mounts, hostname, network and power-off
# and exits with the app's status instead; LDT_BUSYBOX and LDT_APP_CONFIG move the two files.

BB=${LDT_BUSYBOX:-/.ldt/busybox}
CONFIG=${LDT_APP_CONFIG:-/.ldt/app.conf}
NO_SYSTEM=${LDT_INIT_NO_SYSTEM:-}
INT_STOPS= # set in a VM: SIGINT is Ctrl-Alt-Del, the host's power-off request

say() { echo "ldt-init: $*" >&2; }

# The end of the VM: report, flush, power off. PID 1 must never exit in a VM (kernel panic).
finish() {
  echo "ldt-app-exit: $1"
  if [ -n "$NO_SYSTEM" ]; then
    exit "$1"
  fi
  "$BB" kill -KILL -1 2>/dev/null
  "$BB" sync
  "$BB" mount -o remount,ro / 2>/dev/null
  "$BB" poweroff -f
  while :; do "$BB" sleep 3600; done
}

# mount TYPE on DIR with OPTIONS, unless something is mounted there already (the initrd moves
# /dev, /proc, /sys and /run over); the directory is created when the image lacks it.
mnt() {
  if "$BB" grep -q "^[^ ]* $2 " /proc/mounts 2>/dev/null; then
    return 0
  fi
  if ! { "$BB" mkdir -p "$2" && "$BB" mount -t "$1" -o "$3" "$1" "$2"; }; then
    say "cannot mount $1 on $2"
  fi
}

# Put a file of ours over one of the image's, as docker does with /etc/hosts and resolv.conf.
provide() {
  if [ ! -e "$1" ] && [ ! -L "$1" ]; then
    : >"$1" 2>/dev/null
  fi
  "$BB" mount --bind "$2" "$1" 2>/dev/null || say "cannot provide $1"
}

setup_system() {
  mnt proc /proc nosuid,nodev,noexec
  mnt sysfs /sys nosuid,nodev,noexec
  mnt devtmpfs /dev nosuid,mode=0755
  mnt devpts /dev/pts nosuid,noexec,gid=5,mode=0620,ptmxmode=0666
  mnt tmpfs /dev/shm nosuid,nodev,mode=1777
  mnt tmpfs /run nosuid,nodev,mode=0755
  mnt tmpfs /tmp nosuid,nodev,mode=1777
  for link in fd:/proc/self/fd stdin:/proc/self/fd/0 stdout:/proc/self/fd/1 stderr:/proc/self/fd/2; do
    [ -e "/dev/${link%%:*}" ] || "$BB" ln -s "${link#*:}" "/dev/${link%%:*}"
  done
  [ -e /dev/ptmx ] || "$BB" ln -s pts/ptmx /dev/ptmx

  "$BB" hostname "$LDT_HOSTNAME" || say "cannot set the hostname"
  "$BB" mkdir -p /run/ldt
  address=127.0.1.1
  "$BB" ip link set lo up
  # QEMU user-mode networking: the guest is 10.0.2.15, the gateway .2, the DNS forwarder .3.
  # The first network interface, whatever the initrd's udev named it (eth0, enp0s2…).
  nic=
  for dev in /sys/class/net/*; do
    case "${dev##*/}" in lo | '*') ;; *) nic=${dev##*/} && break ;; esac
  done
  if [ -n "$nic" ]; then
    if "$BB" ip link set "$nic" up &&
      "$BB" ip addr add 10.0.2.15/24 dev "$nic" &&
      "$BB" ip route add default via 10.0.2.2; then
      address=10.0.2.15
      echo "nameserver 10.0.2.3" >/run/ldt/resolv.conf
      provide /etc/resolv.conf /run/ldt/resolv.conf
    else
      say "$nic did not come up: no network"
    fi
  fi
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n' \
    "$address" "$LDT_HOSTNAME" >/run/ldt/hosts
  provide /etc/hosts /run/ldt/hosts
  echo "$LDT_HOSTNAME" >/run/ldt/hostname
  provide /etc/hostname /run/ldt/hostname
  # The host's power-off request is Ctrl-Alt-Del: with ctrl-alt-del = 0 the kernel sends us
  # SIGINT instead of rebooting, and in a VM that is the only SIGINT PID 1 gets: `docker stop`.
  if echo 0 >/proc/sys/kernel/ctrl-alt-del; then
    INT_STOPS=1
  else
    say "cannot trap Ctrl-Alt-Del: it reboots"
  fi
  check_shell
}

# check_boot's [check] commands run beside the app in a root shell on the second serial port
# (ttyS1), which only check_boot's VMs have (pipeline/qemu.py check_port_args): no port, no
# shell, in every boot mode alike (the command lines of bios and uefi are inside their disks).
# Started before the app, so the `wait "$app"` below never reaps it. Our busybox's sh runs its
# own applets first, then the image's programs (PATH), then the applets linked in /run/ldt/bin.
check_shell() {
  "$BB" grep -q '^1: uart:[0-9A-Z]' /proc/tty/driver/serial 2>/dev/null || return 0
  "$BB" mkdir -p /run/ldt/bin && "$BB" --install -s /run/ldt/bin 2>/dev/null
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/run/ldt/bin \
    "$BB" setsid "$BB" sh -i </dev/ttyS1 >/dev/ttyS1 2>&1 &
}

if ! [ -r "$CONFIG" ]; then
  say "no $CONFIG: nothing to run"
  finish 255
fi
# shellcheck source=/dev/null
. "$CONFIG"

if [ -z "$NO_SYSTEM" ]; then
  setup_system
fi

# The app: in its working directory (created if missing, like docker), as its uid and gid
# (nsenter without namespaces only sets ids; supplementary groups are dropped), with exactly its
# environment (env -i), reading our stdin (the console). A child, not exec: PID 1 stays ours,
# to reap orphans, forward signals and report the status.
exec 3<&0
(
  "$BB" mkdir -p "$LDT_CWD" 2>/dev/null
  cd "$LDT_CWD" || exit 126
  exec "$BB" nsenter -S "$LDT_UID" -G "$LDT_GID" -- "$BB" env -i "$@"
) <&3 3<&- &
app=$!
exec 3<&-

# SIGTERM is `docker stop`: it becomes the image's STOPSIGNAL (so does SIGINT in a VM). Note: a non-interactive shell
# starts background commands with SIGINT and SIGQUIT ignored (POSIX), so a forwarded SIGINT
# reaches apps that install their own handler, as with docker, where the app is PID 1.
# From here on only builtins (kill, wait, [): a command in a child process would make the shell
# reap the app behind our back, and `kill -0` would then miss it.
# In a VM, SIGINT is the host's power-off request (Ctrl-Alt-Del): it stops the app like SIGTERM.
int_signal=INT
[ -n "$INT_STOPS" ] && int_signal=$LDT_STOP_SIGNAL
trap 'trapped=1; kill -s "$LDT_STOP_SIGNAL" "$app" 2>/dev/null' TERM
trap 'trapped=1; kill -s "$int_signal" "$app" 2>/dev/null' INT

# `wait` returns early (>128) when a trapped signal arrives: then wait again while the app lives
# (a zombie counts). If it ended while the trap ran, the shell has reaped it already and a last
# `wait` gives the status it recorded. While waiting, the shell also reaps the orphans the
# kernel gives PID 1.
while :; do
  trapped=
  wait "$app"
  status=$?
  [ -n "$trapped" ] || break
  kill -0 "$app" 2>/dev/null && continue
  wait "$app"
  status=$?
  break
done
finish "$status"
