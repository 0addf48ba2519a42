#!/bin/sh
# ldt-virt-init: PID 1 of a virt VM. Boots straight into one command, then reset (QEMU runs
# with -no-reboot). It runs under the initrd's shell (klibc's dash on Debian: mount, modprobe,
# mkfifo, cat, chroot, sleep; no busybox needed), so it sticks to POSIX sh and the tools every
# initramfs-tools initrd has. Its per-run settings come from /ldt-virt-conf (pipeline/virt.py
# argv_script()); failures are "ldt-virt-error: <kind> <what>" lines on the console, which
# virt.guest_error() turns into one line with a hint. The literals shared with virt.py
# (ldt-virt-error:, ldt-virt-conf, ldtwork, the 9p msize) are checked by tests/test_virt_unit.py.
#
# With LDT_SNAPSHOT=1 in its settings (pipeline/resume.py) the script stops at the snapshot
# point instead: root mounted read-only (so the disk stays byte-identical to the image and a
# restored guest sees the same blocks on a fresh overlay), modules loaded, ports found, no 9p
# mount (QEMU refuses to migrate a mounted export). It says "ready" on the control port, the
# host saves the VM, and every restored copy reads its own settings from that port: the
# command, the host's clock and fresh randomness, then goes on like a cold boot.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
R=/root
F=/root/run/ldt-virt

fail() {
    echo "ldt-virt-error: $*" > /dev/console
    sync
    echo b > /proc/sysrq-trigger
    sleep 10
}

say() {
    [ "$LDT_DEBUG" = 1 ] || return 0
    read -r up _ < /proc/uptime
    echo "ldt-virt: [$up] $*" > /dev/console
}

# wait_for <test> <path>: up to 10 s for a device node or file to appear
wait_for() {
    n=0
    while ! test "$1" "$2"; do
        n=$((n + 1))
        [ $n -gt 200 ] && return 1
        sleep 0.05
    done
}

mkdir -p /proc /sys /dev /tmp $R
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo 1 > /proc/sys/kernel/printk 2>/dev/null

# shellcheck source=/dev/null
. /ldt-virt-conf

say root modules
# The root image: virtio transport, disk and file system modules from the initrd.
for m in virtio_pci virtio_blk ext4; do
    modprobe -q "$m" || fail initrd-module "$m"
done
wait_for -b /dev/vda || fail no-disk /dev/vda
if [ "$LDT_SNAPSHOT" = 1 ]; then
    mount -t ext4 -o ro /dev/vda $R || fail mount-root /dev/vda
else
    mount -t ext4 /dev/vda $R || fail mount-root /dev/vda
fi
[ -x $R/bin/sh ] || fail no-shell /bin/sh

say root mounted
# The rest only ship with the image's kernel, in the root image.
for m in virtio_console 9pnet_virtio 9p; do
    modprobe -q "$m" 2>/dev/null || modprobe -q -d $R "$m" || fail root-module "$m"
done
if [ "$LDT_NET" = 1 ]; then
    modprobe -q virtio_net 2>/dev/null || modprobe -q -d $R virtio_net || fail root-module virtio_net
fi

mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
ln -s /proc/self/fd $R/dev/fd  # what udev would add to devtmpfs
ln -s /proc/self/fd/0 $R/dev/stdin
ln -s /proc/self/fd/1 $R/dev/stdout
ln -s /proc/self/fd/2 $R/dev/stderr
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/tmp

echo ldt-virt > /proc/sys/kernel/hostname
ipconfig -c none -d lo > /dev/null 2>&1
if [ "$LDT_NET" = 1 ]; then
    wait_for -d /sys/class/net/eth0 || fail no-device eth0
    ipconfig -t 10 -c none -d 10.0.2.15::10.0.2.2:255.255.255.0:ldt-virt:eth0:off > /dev/null 2>&1 \
        || fail network eth0
    rm -f $R/etc/resolv.conf 2>/dev/null
    echo "nameserver 10.0.2.3" > $R/etc/resolv.conf
fi

say finding ports
# The virtio-serial ports, by name (no udev here to make /dev/virtio-ports/ links).
n=0
while :; do
    for p in /sys/class/virtio-ports/*; do
        [ -r "$p/name" ] || continue
        read -r name < "$p/name"
        case "$name" in
            ldt.stdin) IN=/dev/${p##*/} ;;
            ldt.stdout) OUT=/dev/${p##*/} ;;
            ldt.stderr) ERR=/dev/${p##*/} ;;
            ldt.control) CTL=/dev/${p##*/} ;;
        esac
    done
    [ -n "$IN" ] && [ -n "$OUT" ] && [ -n "$ERR" ] && [ -n "$CTL" ] && break
    n=$((n + 1))
    [ $n -gt 200 ] && fail no-ports ldt.stdin
    sleep 0.05
done
for d in "$IN" "$OUT" "$ERR" "$CTL"; do wait_for -c "$d" || fail no-ports "$d"; done

if [ "$LDT_SNAPSHOT" = 1 ]; then
    # Nothing of the saved guest may repeat across runs: after a restore the host's clock and
    # 64 random bytes from the host go into the kernel (clock_settime; written into the pool,
    # then a reseed of its generator, RNDRESEEDCRNG). perl (Debian's perl-base) makes the
    # system calls the initrd's tools cannot; started now, it waits inside the snapshot for
    # its input, so a run does not pay its start-up.
    mkdir -p $F
    fresh=
    if [ -x $R/usr/bin/perl ]; then
        mkfifo $F/fresh
        # shellcheck disable=SC2016 # perl's variables
        chroot $R /usr/bin/perl -e '
            open(my $ok, ">", "/run/ldt-virt/fresh-waiting") or die; close $ok;
            open(my $in, "<", "/run/ldt-virt/fresh") or die "fresh: $!";
            my ($seed, $sec, $nsec) = split(" ", scalar <$in>);
            open(my $r, ">", "/dev/urandom") or die "urandom: $!"; print $r pack("H*", $seed); close $r;
            open($r, "<", "/dev/urandom") or die; ioctl($r, 0x5207, 0) or die "RNDRESEEDCRNG: $!";
            syscall(227, 0, pack("q q", $sec, $nsec)) == 0 or die "clock_settime: $!";
        ' &
        fresh=$!
        wait_for -e $F/fresh-waiting || fail fresh perl
    fi
    # The snapshot point. The control port stays open on fd 3 across the save and restore;
    # each restored guest reads "conf <lines>" and that many lines of settings from it.
    exec 3<> "$CTL"
    echo ready >&3
    IFS= read -r head <&3
    n=${head#conf }
    while [ "$n" -gt 0 ]; do
        IFS= read -r line <&3
        printf '%s\n' "$line"
        n=$((n - 1))
    done > /ldt-virt-conf
    # shellcheck source=/dev/null
    . /ldt-virt-conf
    echo started >&3
    say resumed
    if [ -n "$fresh" ]; then
        echo "$LDT_SEED $LDT_SEC $LDT_NSEC" > $F/fresh
        wait $fresh || fail fresh perl
    else  # no perl: the pool gets the bytes, the generator reseeds on its own schedule
        echo "$LDT_SEED" > /dev/urandom
        chroot $R date -s "@$LDT_SEC" > /dev/null || fail fresh date
    fi
    mount -o remount,rw /dev/vda $R || fail mount-root /dev/vda
else
    exec 3> "$CTL"
fi

say mounting work
mkdir -p $R/work
opts=trans=virtio,version=9p2000.L,msize=524288,cache=mmap
[ "$LDT_RO" = 1 ] && opts=$opts,ro
mount -t 9p -o $opts ldtwork $R/work || fail mount-work ldtwork

# A port opens only once: the command gets FIFOs (reopening /dev/stderr works), and cat
# relays them to the ports.
say starting relays
mkdir -p $F
mkfifo $F/in $F/out $F/err
cat "$IN" > $F/in &
cat $F/out > "$OUT" &
o=$!
cat $F/err > "$ERR" &
e=$!

HOME=/root
USER=root
LOGNAME=root
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME USER LOGNAME PATH
if [ -n "$LDT_TERM" ]; then TERM=$LDT_TERM; export TERM; else unset TERM; fi
say running command
# In the background, so the FIFOs open in a child: the init shell's own blocking opens
# could be interrupted (EINTR), and dash's `wait` retries where open does not.
chroot $R /bin/sh -c 'cd /work && exec "$@"' virt "$@" < $F/in > $F/out 2> $F/err &
wait $!
status=$?

say command done, cleaning up
# The command is done: stop whatever it left behind (and the stdin relay), let the
# output relays drain, then report.
for p in /proc/[0-9]*; do
    p=${p#/proc/}
    case " 1 $o $e " in *" $p "*) ;; *) kill -9 "$p" 2> /dev/null ;; esac
done
: <> $F/out  # a relay still waiting for a writer gets one, and then EOF
: <> $F/err
wait $o $e
sync
say reporting

# A port write returns once the data is queued, not once QEMU took it: a reset now could
# drop output QEMU holds back while the host reads slowly. So the host learns how many
# bytes each port sent (virtio_console's debugfs statistics) and ends the VM itself when it
# has them all. Without the statistics the guest resets after a grace period.
sent() {
    f=/sys/kernel/debug/virtio-ports/${1#/dev/}
    [ -r "$f" ] || { echo -; return; }
    while read -r key value; do
        [ "$key" = bytes_sent: ] && { echo "$value"; return; }
    done < "$f"
    echo -
}
mkdir -p /sys/kernel/debug
mount -t debugfs debugfs /sys/kernel/debug 2> /dev/null
out=$(sent "$OUT")
err=$(sent "$ERR")
echo "status $status $out $err" >&3
if [ "$out" = - ] || [ "$err" = - ]; then sleep 1; echo b > /proc/sysrq-trigger; fi
while :; do sleep 3600; done
