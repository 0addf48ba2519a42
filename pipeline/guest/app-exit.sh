#!/bin/sh
# ExecStopPost= of ldt-app.service (pipeline/app.py systemd_unit): tell the host how the app
# ended, as the line "ldt-app-exit: N" on the console, N as docker reports it: the exit code,
# or 128 + the number of the signal that killed it.
# systemd sets EXIT_CODE (exited, killed or dumped) and EXIT_STATUS (a number or a signal name).
# LDT_CONSOLE (tests): where the line goes instead of /dev/console.
case "${EXIT_CODE:-}" in
  exited) status=${EXIT_STATUS:-255} ;;
  killed | dumped) status=$((128 + $(kill -l "${EXIT_STATUS#SIG}"))) ;;
  *) status=255 ;; # the app never ran
esac
echo "ldt-app-exit: $status" >"${LDT_CONSOLE:-/dev/console}"
