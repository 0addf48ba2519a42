#!/bin/sh
# shellcheck shell=sh
#
# initramfs-tools local-bottom script (an OS image's own initrd), after the root file system is
# mounted: with a dm-verity root (ldt.verity= on the kernel command line, opened read-only by
# verity-local-top.sh), the writable state goes on tmpfs: /var and /tmp, empty at each boot (as
# with systemd.volatile=state: systemd-tmpfiles fills /var in). /etc is read from the root.

PREREQ=""
case $1 in
prereqs)
  echo "$PREREQ"
  exit 0
  ;;
esac

verity=
# shellcheck disable=SC2013 # the command line is words, not lines
for word in $(cat /proc/cmdline); do
  case $word in
  ldt.verity=*) verity=1 ;;
  esac
done
[ -n "$verity" ] || exit 0

root=${rootmnt:-/root}
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs "$root/var" || echo "ldt-verity: cannot mount a tmpfs on /var"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs "$root/tmp" || echo "ldt-verity: cannot mount a tmpfs on /tmp"
exit 0
