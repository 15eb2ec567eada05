# shellcheck shell=bash
# Bring a fresh Debian 12 host to the point where velocityfs can be run and tested.
#
# Sourced by scripts/test and scripts/run so both start from the same known state.
# Idempotent: a second run installs nothing, rebuilds nothing, mounts nothing.
# Leaves the caller in the repository top and sets TOP to its absolute path.

# The repository top is derived from this file's own path, so callers may run from any cwd.
TOP="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export TOP
cd "$TOP"

VELOCITYFS_DEB_PACKAGES=(
    fuse3 libfuse3-dev pkg-config postgresql rsync mergerfs qemu-utils attr util-linux systemd wrk fio
    curl
    mount
    patch
)
# Without their recommends, which bring qemu-system (hundreds of MB): libvirt's daemon and
# virsh, for tests/test_libvirt.py (11 MB to fetch, 18 MB installed, 15 s here).
VELOCITYFS_DEB_LEAN_PACKAGES=(libvirt-daemon-system libvirt-clients)

_vfs_log() { echo "bootstrap: $*" >&2; }
_vfs_die() { echo "bootstrap: ERROR: $*" >&2; return 1; }

# Run a command as root: directly when we are root, through sudo otherwise.
_vfs_as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    else
        sudo "$@"
    fi
}

# Install the Debian packages the daemon and tests need, but only the missing ones,
# so that the common case (everything present) never touches the network.
_vfs_not_installed() {
    local pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            echo "$pkg"
        fi
    done
}

_vfs_ensure_debs() {
    local missing lean
    mapfile -t missing < <(_vfs_not_installed "${VELOCITYFS_DEB_PACKAGES[@]}")
    mapfile -t lean < <(_vfs_not_installed "${VELOCITYFS_DEB_LEAN_PACKAGES[@]}")
    [[ ${#missing[@]} -eq 0 && ${#lean[@]} -eq 0 ]] && return 0
    _vfs_log "installing missing Debian packages: ${missing[*]} ${lean[*]}"
    _vfs_as_root apt-get update || _vfs_die "apt-get update failed" || return 1
    if [[ ${#missing[@]} -gt 0 ]]; then
        _vfs_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" \
            || _vfs_die "apt-get install ${missing[*]} failed" || return 1
    fi
    if [[ ${#lean[@]} -gt 0 ]]; then
        _vfs_as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends "${lean[@]}" \
            || _vfs_die "apt-get install ${lean[*]} failed" || return 1
    fi
}

VENV_STAMP="$TOP/.venv/.velocityfs-installed"

_vfs_ensure_venv() {
    if [[ ! -x "$TOP/.venv/bin/python" ]]; then
        _vfs_log "creating virtualenv in $TOP/.venv"
        rm -rf "$TOP/.venv"
        python3 -m venv "$TOP/.venv" || _vfs_die "python3 -m venv failed" || return 1
        rm -f "$VENV_STAMP"
    fi
}

# Keep .venv in step with pyproject.toml: (re)install when the venv is new or the
# project metadata changed since the last successful install (tracked by a stamp).
_vfs_ensure_install() {
    local stamp="$VENV_STAMP"
    if [[ ! -e "$stamp" || "$TOP/pyproject.toml" -nt "$stamp" ]]; then
        _vfs_log "installing velocityfs into .venv (pip install -e '.[test]')"
        "$TOP/.venv/bin/python" -m pip install --disable-pip-version-check -q -e "$TOP[test]" \
            || _vfs_die "pip install -e '.[test]' failed" || return 1
        touch "$stamp"
    fi
}

# pyfuse3 (3.5.0, the newest release) has no handlers for FUSE's fallocate, lseek and
# copy_file_range requests, so fallocate(2) on the mount would get EOPNOTSUPP, holes
# would read as data (SEEK_DATA/SEEK_HOLE) and copies would go block by block; nor can
# a file system ask for FUSE_HANDLE_KILLPRIV_V2 at init, without which the kernel asks
# getxattr("security.capability") before every write. Until upstream has them, build
# that release from PyPI's source with patches/pyfuse3-velocityfs.patch (handlers in
# the style of its fsync one, the option in that of enable_acl). Skipped when the
# installed pyfuse3 carries this patch's digest in its local version label, so a .venv
# built from any other patch (or none) is rebuilt. Only pyfuse3 comes from source: its
# build dependencies (Cython, setuptools) are wheels, where `--no-binary :all:` used to
# compile Cython too. Run before `pip install -e`, which then finds pyfuse3 installed
# instead of compiling the unpatched release first (PyPI has no wheel of it).
PYFUSE3_VERSION=3.5.0
PYFUSE3_PATCH="$TOP/patches/pyfuse3-velocityfs.patch"
# Our build's local version label (`pip show pyfuse3`): the patch's digest, behind a
# letter so that no digest reads as a number (which the version would normalise).
PYFUSE3_BUILD="velocityfs.p$(sha256sum "$PYFUSE3_PATCH" | cut -c1-12)"
_vfs_ensure_pyfuse3() {
    local py="$TOP/.venv/bin/python" work src
    if "$py" -c 'import importlib.metadata, sys
sys.exit(importlib.metadata.version("pyfuse3") != sys.argv[1])' \
        "$PYFUSE3_VERSION+$PYFUSE3_BUILD" 2>/dev/null; then
        return 0
    fi
    _vfs_log "building pyfuse3 $PYFUSE3_VERSION with the fallocate, lseek and" \
        "copy_file_range handlers and FUSE_HANDLE_KILLPRIV_V2 (patches/pyfuse3-velocityfs.patch)"
    work="$(mktemp -d)"
    src="$work/pyfuse3-$PYFUSE3_VERSION"
    if "$py" -m pip download --disable-pip-version-check -q --no-deps --no-binary pyfuse3 \
        -d "$work" "pyfuse3==$PYFUSE3_VERSION" \
        && tar xzf "$src.tar.gz" -C "$work" \
        && patch -d "$src" -p1 -s <"$PYFUSE3_PATCH" \
        && SETUPTOOLS_SCM_PRETEND_VERSION="$PYFUSE3_VERSION+$PYFUSE3_BUILD" \
            "$py" -m pip install --disable-pip-version-check -q --no-deps "$src"; then
        rm -rf "$work"
        return 0
    fi
    rm -rf "$work"
    _vfs_die "could not build pyfuse3 $PYFUSE3_VERSION with patches/pyfuse3-velocityfs.patch"
}

# FUSE needs /dev/fuse; the test watchdog needs fusectl to abort a hung connection.
_vfs_ensure_fuse() {
    if [[ ! -c /dev/fuse && $(id -u) -eq 0 ]]; then
        # Containers sometimes lack the node although the kernel has FUSE; try once.
        modprobe fuse 2>/dev/null || true
        [[ -e /dev/fuse ]] || mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
    fi
    if [[ ! -c /dev/fuse ]]; then
        _vfs_die "/dev/fuse is missing or not a character device: this host (or container)" \
            "cannot run FUSE. Load the fuse module, or start the container with" \
            "--device /dev/fuse --cap-add SYS_ADMIN." || return 1
    fi
    local ctl=/sys/fs/fuse/connections
    if mountpoint -q "$ctl" 2>/dev/null; then
        return 0
    fi
    if [[ $(id -u) -eq 0 ]]; then
        [[ -d $ctl ]] || modprobe fuse 2>/dev/null || true
        mount -t fusectl none "$ctl" \
            || _vfs_die "could not mount fusectl on $ctl; the test watchdog needs it to" \
                "abort hung FUSE mounts" || return 1
    else
        _vfs_log "WARNING: fusectl is not mounted on $ctl and we are not root;" \
            "hung test mounts cannot be aborted, only killed" \
            "(fix: sudo mount -t fusectl none $ctl)"
    fi
}

_vfs_ensure_debs || return 1
_vfs_ensure_venv || return 1
_vfs_ensure_pyfuse3 || return 1
_vfs_ensure_install || return 1
_vfs_ensure_fuse || return 1
