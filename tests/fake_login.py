"""A getty + login stand-in for the console tests, run on a pseudo-terminal (pty.fork).

Environment:
  FAKE_PASSWORD   the password it asks for (unset: no password prompt)
  FAKE_NO_GETTY   1: print boot messages and never a login prompt
  FAKE_NOISE      1: a background process writes kernel-like lines to the terminal every 50 ms,
                  through the whole session (like printk on a serial console)
  FAKE_LOGIN_DELAY  seconds login takes after the password (a slow PAM under TCG)
  FAKE_SHELL_ONLY 1: no getty, a shell at once (our init's shell beside an app)

Like util-linux: `<host> login: `, then `Password: ` with echo off, "Login incorrect" and the
prompt again on a wrong one, then a shell (/bin/sh -i) with a coloured prompt.
"""

import os
import subprocess
import sys
import termios
import time

HOST = "fakehost"
NOISE = r'i=0; while sleep 0.05; do i=$((i+1)); printf "[ %5d.123456] usb 1-1: noise %s\r\n" "$i" "$i"; done'


def line() -> str:
    data = sys.stdin.readline()
    if not data:
        sys.exit(0)
    return data.rstrip("\r\n")


def read_secret() -> str:
    attrs = termios.tcgetattr(0)
    quiet = list(attrs)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(0, termios.TCSADRAIN, quiet)
    try:
        return line()
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, attrs)


def main() -> None:
    out = sys.stdout
    out.write("\x1b[0;1;32m[  OK  ]\x1b[0m Started serial-getty@ttyS0.service.\r\n")
    out.flush()
    if os.environ.get("FAKE_NOISE") == "1":
        subprocess.Popen(["/bin/sh", "-c", NOISE])  # inherits the terminal; outlives the exec below
    if os.environ.get("FAKE_NO_GETTY") == "1":
        while True:
            time.sleep(3600)
    password = os.environ.get("FAKE_PASSWORD")
    if os.environ.get("FAKE_SHELL_ONLY") == "1":
        shell()
    while True:
        out.write(f"\r\nDebian GNU/Linux 12 {HOST} ttyS0\r\n\r\n{HOST} login: ")
        out.flush()
        user = line()
        if not user:  # an empty line: the prompt again, like agetty
            continue
        if password is not None:
            out.write("Password: ")
            out.flush()
            given = read_secret()
            out.write("\r\n")
            time.sleep(float(os.environ.get("FAKE_LOGIN_DELAY", "0")))
            if user != "root" or given != password:
                out.write("\r\nLogin incorrect\r\n")
                out.flush()
                continue
        out.write("Linux fakehost 6.1.0 #1 SMP x86_64\r\n\r\nThe programs included with Debian are free.\r\n")
        out.flush()
        shell()


def shell() -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TERM": "xterm-256color",
           "PS1": "\x1b[01;32mroot@fakehost\x1b[00m:\x1b[01;34m~\x1b[00m# "}
    os.execve("/bin/sh", ["sh", "-i"], env)


if __name__ == "__main__":
    main()
