#!/bin/sh
# ExecStopPost= of ldt-app.service (pipeline/app.py systemd_unit): tell the host how the app
# ended, as the line "ldt-app-exit: N" on the console, N as docker reports it: the exit code,
# or 128 + the number of the signal that killed it.
# systemd sets EXIT_CODE (exited, killed or dumped) and EXIT_STATUS (a number or a signal name).
# LDT_CONSOLE (tests): where the line goes instead of /dev/console.
# dash's `kill -l` does not turn a name into a number: the Linux (x86, arm) numbers.
signal_number() {
  case "$1" in
    HUP) echo 1 ;; INT) echo 2 ;; QUIT) echo 3 ;; ILL) echo 4 ;; TRAP) echo 5 ;; ABRT) echo 6 ;;
    BUS) echo 7 ;; FPE) echo 8 ;; KILL) echo 9 ;; USR1) echo 10 ;; SEGV) echo 11 ;; USR2) echo 12 ;;
    PIPE) echo 13 ;; ALRM) echo 14 ;; TERM) echo 15 ;; STKFLT) echo 16 ;; CHLD) echo 17 ;; CONT) echo 18 ;;
    STOP) echo 19 ;; TSTP) echo 20 ;; TTIN) echo 21 ;; TTOU) echo 22 ;; URG) echo 23 ;; XCPU) echo 24 ;;
    XFSZ) echo 25 ;; VTALRM) echo 26 ;; PROF) echo 27 ;; WINCH) echo 28 ;; IO | POLL) echo 29 ;;
    PWR) echo 30 ;; SYS) echo 31 ;; *) echo 127 ;;
  esac
}

case "${EXIT_CODE:-}" in
  exited) status=${EXIT_STATUS:-255} ;;
  killed | dumped) status=$((128 + $(signal_number "${EXIT_STATUS#SIG}"))) ;;
  *) status=255 ;; # the app never ran
esac
echo "ldt-app-exit: $status" >"${LDT_CONSOLE:-/dev/console}"
