#!/bin/sh
# /sbin/init of the test repository's base package: say the tree booted (pacman_repo.MARKER, the
# distribution's ID, the root device, how many packages pacman installed), then wait: the test quits QEMU.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc 2>/dev/null
# shellcheck source=/dev/null
. /etc/os-release
root=$(grep ' / ' /proc/mounts | head -1 | cut -d' ' -f1)
count=0
for p in /var/lib/pacman/local/*-*; do
  [ -d "$p" ] && count=$((count + 1))
done
echo "LDT-ARCH-BOOTED: $ID $(uname -r) root=$root packages=$count"
while :; do sleep 3600; done
