#!/usr/bin/env bash
# The system packages `make` needs, installed when it can be (the Makefile calls this).
#
#   bash tests/system-deps.sh suite [LABEL]   what the test suite drives: the OpenSSH server
#       (tests/sshd.py starts /usr/sbin/sshd on loopback) and client, rsync, procps, and chromium
#       with chromedriver (the HTML report test drives /usr/bin/chromium)
#   bash tests/system-deps.sh venv [LABEL]    a python3 >= 3.10 that can create a venv (on
#       Debian/Ubuntu, venv's ensurepip comes in the python3-venv package)
#
# All there: silent, exit 0. Something missing, on a machine with apt-get, as root or with
# passwordless sudo: `apt-get update`, then `apt-get install` of just what is missing.
# Otherwise: one line on stderr naming the command to run (without apt-get, e.g. on macOS:
# the tools that are missing) and exit 1. LABEL names the caller in that line ("make test").
set -euo pipefail

what=${1:-}
label=${2:-make $what}
packages="" tools=""  # what is missing: Debian package names, and the tools they bring

fail() {
    echo "$label $*" >&2
    exit 1
}

# need PACKAGE TOOL CHECK...: note PACKAGE and TOOL as missing unless the command CHECK succeeds.
need() {
    local package=$1 tool=$2
    shift 2
    "$@" >/dev/null 2>&1 || { packages+=" $package"; tools+=", $tool"; }
}

check_suite() {
    need openssh-server /usr/sbin/sshd test -x /usr/sbin/sshd  # absolute in tests/sshd.py
    need openssh-client ssh command -v ssh
    need rsync rsync command -v rsync
    need procps ps command -v ps  # a cluster worker's process group, checked on the "box"
    need chromium /usr/bin/chromium test -x /usr/bin/chromium  # absolute in the report test
    need chromium-driver /usr/bin/chromedriver test -x /usr/bin/chromedriver
}

check_venv() {  # python3 itself is checked first: apt-get cannot bring a newer one everywhere
    need python3-venv "python3's venv and ensurepip modules" python3 -c "import ensurepip, venv"
}

case $what in
    suite) check=check_suite ;;
    venv)
        command -v python3 >/dev/null || fail "needs Python >= 3.10: python3 is not on PATH"
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
            || fail "needs Python >= 3.10: python3 is $(python3 -V 2>&1) ($(command -v python3))"
        check=check_venv ;;
    *) echo "usage: $0 suite|venv [LABEL]" >&2; exit 2 ;;
esac

$check
[ -n "$packages" ] || exit 0
packages=${packages# } tools=${tools#, }
command -v apt-get >/dev/null || fail "needs $tools: install them with your package manager"

# apt-get as root, or through passwordless sudo; otherwise say what to run.
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
else
    fail "needs $packages: run sudo apt-get update && sudo apt-get install -y $packages"
fi
echo "$label: installing $packages (apt-get)" >&2
# shellcheck disable=SC2086  # $sudo and $packages are lists of words on purpose
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
# shellcheck disable=SC2086  # (dpkg's progress to /dev/null; its errors go to stderr)
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages \
    >/dev/null

# Installed, yet still missing (e.g. python3 is not the system's own): say what is left.
installed=$packages packages="" tools=""
$check
[ -z "$packages" ] || fail "still lacks ${tools#, } after apt-get install $installed"
