#!/usr/bin/env bash
# Make Debian's python3-rados / python3-rbd importable from a virtualenv.
#
# Usage: .ci/link-ceph-bindings.sh VENV
#
# Debian ships the Ceph bindings only as CPython 3.11 extension modules in
# /usr/lib/python3/dist-packages (there is no rados/rbd distribution on PyPI).
# They link librados/librbd, not libpython, so any CPython 3.11.x with the same
# SOABI can load them.  This symlinks exactly the two modules and their
# egg-info (so importlib.metadata sees rados/rbd 2.0.0) into the venv's
# site-packages; a .pth file would expose all of Debian's dist-packages.
# Idempotent: re-running replaces the links.
set -euo pipefail

die() { echo "link-ceph-bindings: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 VENV"
venv=$1
py=$venv/bin/python
[ -x "$py" ] || die "$py not found or not executable (is '$venv' a virtualenv?)"

src=/usr/lib/python3/dist-packages
soabi=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("SOABI"))') \
    || die "cannot run $py"
[ "$soabi" = cpython-311-x86_64-linux-gnu ] \
    || die "venv SOABI is '$soabi', Debian's modules are cpython-311-x86_64-linux-gnu (need CPython 3.11 on x86_64)"

for m in rados rbd; do
    [ -f "$src/$m.$soabi.so" ] \
        || die "$src/$m.$soabi.so missing: install python3-rados python3-rbd (apt-get install python3-rados python3-rbd)"
    [ -d "$src/$m-2.0.0.egg-info" ] || [ -f "$src/$m-2.0.0.egg-info" ] \
        || die "$src/$m-2.0.0.egg-info missing: unexpected python3-$m package version"
done

sp=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])') \
    || die "cannot find site-packages of $venv"
[ -d "$sp" ] || die "site-packages '$sp' does not exist"

for m in rados rbd; do
    for t in "$sp/$m.$soabi.so" "$sp/$m-2.0.0.egg-info"; do
        if [ -e "$t" ] && [ ! -L "$t" ]; then
            die "$t exists and is not a symlink; remove it first"
        fi
    done
    ln -sfn "$src/$m.$soabi.so" "$sp/$m.$soabi.so"
    ln -sfn "$src/$m-2.0.0.egg-info" "$sp/$m-2.0.0.egg-info"
done

"$py" -c 'import rados, rbd' 2>/dev/null \
    || die "symlinks created in $sp but 'import rados, rbd' fails under $py (missing librados2/librbd1?)"
echo "linked rados, rbd into $sp"
