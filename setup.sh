#!/bin/sh
# Set up what is missing on a Debian 12 machine: host tools (apt), a running Docker daemon,
# and a virtualenv in .venv with this package installed. Safe to run again: it skips what is there.
set -eu
cd "$(dirname "$0")"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
say() { echo "setup: $*" >&2; }

PACKAGES="python3 python3-venv docker.io mmdebstrap isal pigz qemu-system-x86 qemu-utils ovmf \
 syslinux syslinux-common mtools dosfstools e2fsprogs fdisk systemd-boot-efi fakeroot binutils \
 cpio shellcheck docker-registry apache2-utils busybox-static sbsigntool cryptsetup-bin dmsetup openssl faketime \
 arch-install-scripts pacman-package-manager makepkg archlinux-keyring uidmap zstd libarchive-tools"
missing=""
for p in $PACKAGES; do
  dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing:$missing"
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

if ! $SUDO docker info >/dev/null 2>&1; then
  if [ -d /run/systemd/system ]; then
    say "starting docker (systemctl)"
    $SUDO systemctl start docker
  else
    say "starting dockerd in the background (log: /var/log/dockerd.log)"
    $SUDO sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
  fi
  i=0
  until $SUDO docker info >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -lt 60 ] || { say "dockerd did not answer within 60s; see /var/log/dockerd.log"; exit 1; }
    sleep 1
  done
fi
if [ "$(id -u)" != 0 ] && ! docker info >/dev/null 2>&1; then
  say "the Docker daemon runs, but $(id -un) may not use it: sudo usermod -aG docker $(id -un), then log in again"
fi

stamp=.venv/.ldt-installed
want=$(cat pyproject.toml | cksum)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "creating .venv and installing the project (pip install -e .[test])"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
say "ready"
