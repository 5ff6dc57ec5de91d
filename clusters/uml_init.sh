#!/bin/sh
# PID 1 of a svcbench guest kernel (clusters/uml.py boots it with the host's / as hostfs).
# The kernel command line hands over SVCBENCH_JOB, SVCBENCH_PYTHON and SVCBENCH_REPO.
# Whatever happens, the guest powers itself off: PID 1 must never exit (UML would panic).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# The guest's own /run: its netns files and run state must never appear on the host.
mount -t tmpfs -o mode=755 tmpfs /run
grep -q ' /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mkdir -p /run/tmp /run/lock
chmod 1777 /run/tmp
cd "$SVCBENCH_REPO" || cd /
PYTHONPATH="$SVCBENCH_REPO" "$SVCBENCH_PYTHON" -m clusters.uml_guest guest "$SVCBENCH_JOB"
echo "svcbench-guest: runner exited with status $?"
sync
echo o > /proc/sysrq-trigger
while :; do sleep 60; done
