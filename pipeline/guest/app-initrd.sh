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
#   /lib/ldt/dm/             with [disk] verity: dmsetup, its libraries and their loader (the
#                            build host's), run as ld.so --library-path /lib/ldt/dm dmsetup
#
# With ldt.verity=DATA,HASH,BLOCKS,ALG,ROOTHASH,SALT (pipeline/verity.py Verity.ldt_cmdline, the
# same words verity-local-top.sh reads), the root is opened through dm-verity as /dev/mapper/root
# (DATA and HASH as PARTUUID=… or a /dev path, 4 KiB blocks, the tree after veritysetup's
# superblock), mounted read-only, and /var and /tmp are tmpfs.
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

# The partition whose GPT unique GUID (PARTUUID) is $1, read from the entries at LBA 2 (128 bytes
# each, the layout every GPT disk we write has) of its disk: busybox has no blkid.
guid_of_entry() {
  hex=$("$BB" dd if="$1" bs=128 skip=$((8 + $2 - 1)) count=1 2>/dev/null | "$BB" od -An -tx1 -v | "$BB" tr -d ' \n')
  c() { echo "$hex" | "$BB" cut -c"$1"; }
  echo "$(c 39-40)$(c 37-38)$(c 35-36)$(c 33-34)-$(c 43-44)$(c 41-42)-$(c 47-48)$(c 45-46)-$(c 49-52)-$(c 53-64)"
}

partuuid_dev() {
  want=$(echo "$1" | "$BB" tr 'A-F' 'a-f')
  for sys in /sys/class/block/*; do
    [ -f "$sys/partition" ] || continue
    disk=$("$BB" basename "$("$BB" dirname "$("$BB" readlink -f "$sys")")")
    [ "$(guid_of_entry "/dev/$disk" "$("$BB" cat "$sys/partition")")" = "$want" ] || continue
    echo "/dev/$("$BB" basename "$sys")"
    return 0
  done
  return 1
}

# A device named PARTUUID=… or by its path, once it is there: up to $2 tenths of a second.
find_dev() {
  tries=0
  while [ "$tries" -lt "$2" ]; do
    case $1 in
    PARTUUID=*) partuuid_dev "${1#PARTUUID=}" && return 0 ;;
    *) [ -b "$1" ] && echo "$1" && return 0 ;;
    esac
    "$BB" usleep 100000
    tries=$((tries + 1))
  done
  return 1
}

# ldt.verity=…: /dev/mapper/root, the root read through dm-verity.
open_verity() {
  old_ifs=$IFS
  IFS=,
  # shellcheck disable=SC2086 # split on commas on purpose
  set -- $1
  IFS=$old_ifs
  [ $# -eq 6 ] || fail "ldt.verity= wants DATA,HASH,BLOCKS,ALG,ROOTHASH,SALT"
  data_dev=$(find_dev "$1" 120) || fail "verity data device $1 is not there (waited 12 s)"
  hash_dev=$(find_dev "$2" 20) || fail "verity hash device $2 is not there"
  [ -d /sys/module/dm_verity ] || fail "the dm-verity module did not load"
  table="0 $(($3 * 8)) verity 1 $data_dev $hash_dev 4096 4096 $3 1 $4 $5 $6"
  "$DIR/dm/ld.so" --library-path "$DIR/dm" "$DIR/dm/dmsetup" create --readonly --noudevsync root --table "$table" ||
    fail "device-mapper refused the verity table"
  "$DIR/dm/ld.so" --library-path "$DIR/dm" "$DIR/dm/dmsetup" mknodes root
  [ -b /dev/mapper/root ] || fail "/dev/mapper/root did not appear"
  echo "ldt-verity: root opened: $data_dev verified by $hash_dev (root hash $5)"
}

"$BB" mkdir -p /dev /proc /sys /root
"$BB" mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
"$BB" mount -t proc -o nosuid,nodev,noexec proc /proc
"$BB" mount -t sysfs -o nosuid,nodev,noexec sysfs /sys

root=''
verity=''
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
  ldt.verity=*) verity=${word#ldt.verity=} ;;
  esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"

load "$DIR/first"
if [ -n "$verity" ]; then
  open_verity "$verity"
  mode=ro
fi
if ! find_root 20; then
  load "$DIR/more"
  find_root 100 || fail "the root file system $root is not there (waited 12 s)"
fi
"$BB" mount -t "$fstype" -o "$mode" "$dev" /root || fail "cannot mount $dev ($root) on /root"
[ -x "/root$init" ] || [ -L "/root$init" ] || fail "the root file system has no $init"
if [ -n "$verity" ]; then # the writable state: empty at each boot
  "$BB" mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /root/var || fail "cannot mount a tmpfs on /var"
  "$BB" mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /root/tmp || fail "cannot mount a tmpfs on /tmp"
fi

# /dev, /proc and /sys move into the root (our app init finds them mounted).
for fs in /dev /proc /sys; do
  "$BB" mount --move "$fs" "/root$fs" 2>/dev/null || "$BB" umount -l "$fs"
done
# switch_root must be PID 1 itself; it only comes back if busybox could not run it at all.
# shellcheck disable=SC2093
exec "$BB" switch_root /root "$init"
fail "cannot run switch_root"
