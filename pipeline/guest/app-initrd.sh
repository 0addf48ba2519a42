#!/bin/busybox sh
# shellcheck shell=sh
#
# /init of the initramfs that app images on our init boot with (pipeline/initramfs.py
# app_initrd): load the few kernel modules the VM needs, mount the root file system that
# root= names, and hand over to init= in it (our app init, /.ldt/init). No udev and no
# scripts: under TCG this is seconds faster than the kernel recipe's own initramfs.
#
#   /bin/busybox             every command below is its applet
#   /lib/ldt/modules/*.ko    the modules, uncompressed
#   /lib/ldt/first           the modules of the run targets' VM (virtio disk and network, ext4),
#                            one name a line in load order: always loaded
#   /lib/ldt/more            the other disk buses' (SATA, NVMe, USB): loaded only when the root
#                            is not there after the first
#
# Anything that goes wrong ends in one "ldt-initrd: …" line on the console and a power-off.

BB=/bin/busybox
DIR=/lib/ldt
FAILED=

say() { echo "ldt-initrd: $*"; }

fail() {
  say "$*"
  [ -z "$FAILED" ] || say "modules that did not load:$FAILED"
  "$BB" poweroff -f
  while :; do "$BB" sleep 3600; done
}

load() {
  while read -r module; do
    "$BB" insmod "$DIR/modules/$module" 2>/dev/null || FAILED="$FAILED ${module%.ko}"
  done <"$1"
}

# The device root= names (UUID=…, LABEL=… or a path), once it is there; waits up to $1 tenths
# of a second, since a controller's disks show up after its driver has loaded.
find_root() {
  tries=0
  while [ "$tries" -lt "$1" ]; do
    case $root in
    UUID=* | LABEL=*) dev=$("$BB" findfs "$root" 2>/dev/null) && return 0 ;;
    *) [ -b "$root" ] && dev=$root && return 0 ;;
    esac
    "$BB" usleep 100000
    tries=$((tries + 1))
  done
  return 1
}

"$BB" mkdir -p /dev /proc /sys /root
"$BB" mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
"$BB" mount -t proc -o nosuid,nodev,noexec proc /proc
"$BB" mount -t sysfs -o nosuid,nodev,noexec sysfs /sys

root=''
init=/sbin/init
fstype=ext4
mode=rw
# shellcheck disable=SC2013 # the command line is words, not lines
for word in $("$BB" cat /proc/cmdline); do
  case $word in
  root=*) root=${word#root=} ;;
  init=*) init=${word#init=} ;;
  rootfstype=*) fstype=${word#rootfstype=} ;;
  ro | rw) mode=$word ;;
  esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"

load "$DIR/first"
if ! find_root 20; then
  load "$DIR/more"
  find_root 100 || fail "the root file system $root is not there (waited 12 s)"
fi
"$BB" mount -t "$fstype" -o "$mode" "$dev" /root || fail "cannot mount $dev ($root) on /root"
[ -x "/root$init" ] || [ -L "/root$init" ] || fail "the root file system has no $init"

# /dev, /proc and /sys move into the root (our app init finds them mounted).
for fs in /dev /proc /sys; do
  "$BB" mount --move "$fs" "/root$fs" 2>/dev/null || "$BB" umount -l "$fs"
done
# switch_root must be PID 1 itself; it only comes back if busybox could not run it at all.
# shellcheck disable=SC2093
exec "$BB" switch_root /root "$init"
fail "cannot run switch_root"
