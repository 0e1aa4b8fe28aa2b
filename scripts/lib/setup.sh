# Shared setup for scripts/test, scripts/demo and scripts/bench (sourced, not run).
#
# Installs what is missing and nothing else, so a second run is fast:
#   * Debian packages fuse3, libfuse3-dev, pkg-config (pyfuse3 builds against libfuse3), and
#     the commands named in $TASKFS_TOOLS (each a package of that name);
#   * a virtual environment in $ROOT/.venv (override with TASKFS_VENV);
#   * the taskfs package, editable, with the extras in $TASKFS_EXTRAS (default: dev,bench),
#     reinstalled only when pyproject.toml changed since the last install.
# Leaves $ROOT, $VENV and $PY set, and the venv's bin first on PATH.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${TASKFS_VENV:-$ROOT/.venv}
EXTRAS=${TASKFS_EXTRAS:-dev,bench}

say() { printf '==> %s\n' "$*" >&2; }

need_debs=()
command -v fusermount3 >/dev/null 2>&1 || need_debs+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || need_debs+=(libfuse3-dev pkg-config)
# Tools a caller needs besides (scripts/test: rsync, which a FUSE test runs over the mount).
for tool in ${TASKFS_TOOLS:-}; do
    command -v "$tool" >/dev/null 2>&1 || need_debs+=("$tool")
done
if ((${#need_debs[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing Debian packages ${need_debs[*]} and no apt-get: install them by hand"
        exit 1
    fi
    sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    say "installing Debian packages: ${need_debs[*]}"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        "${need_debs[@]}" >/dev/null
fi

python=""
for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    say "taskfs needs Python >= 3.11"
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$python" -m venv "$VENV"
fi
PY=$VENV/bin/python

stamp=$VENV/.taskfs-installed
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $EXTRAS"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c 'import taskfs' 2>/dev/null; then
    say "installing taskfs[$EXTRAS] into $VENV"
    log=$VENV/.taskfs-install.log
    if ! { "$PY" -m pip install --disable-pip-version-check --upgrade pip &&
        "$PY" -m pip install --disable-pip-version-check -e "$ROOT[$EXTRAS]"; } >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        say "installing taskfs failed (full log: $log)"
        exit 1
    fi
    echo "$want" >"$stamp"
fi
export PATH="$VENV/bin:$PATH"
