#!/usr/bin/env bash
# Builds a real kube-apiserver and kube-controller-manager (Kubernetes v1.20.2) from Debian
# bookworm's source package, for the tests that need a Kubernetes API server. No registry ships
# these binaries; Debian's source tree carries its vendored dependencies, so the build needs only
# Debian's Go. The result is cached outside the checkout: a second run on the same machine only
# prints the directory. Needs root (apt-get). Prints the directory holding the binaries.
# Also installs etcd (Debian's etcd-server), which the test fixture starts beside them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

# Bumped whenever the build below changes, so that a machine with an older cached build rebuilds.
recipe=2
cache="${TUNEFLEET_KUBE_CACHE:-/var/cache/tunefleet-kube}"
bin="$cache/bin"
export DEBIAN_FRONTEND=noninteractive
if ! command -v etcd > /dev/null; then
  apt-get install -y -qq --no-install-recommends etcd-server >&2
fi
if [[ -x "$bin/kube-apiserver" && -x "$bin/kube-controller-manager" \
      && "$(cat "$bin/recipe" 2> /dev/null)" == "$recipe" ]]; then
  echo "$bin"
  exit 0
fi

apt-get install -y -qq --no-install-recommends golang-go rsync make dpkg-dev \
  golang-github-modern-go-reflect2-dev >&2

# A private apt configuration that adds the deb-src line, leaving the system's untouched. Its
# mirror is the one the machine's own apt sources name (apt_source.py), which fails with one line
# when there is none.
source_line="$(python3 "$here/apt_source.py" bookworm)"
mkdir -p "$cache/apt/lists/partial" "$cache/src"
echo "$source_line" > "$cache/apt/sources.list"
apt_options=(-o "Dir::Etc::SourceList=$cache/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
             -o "Dir::State::Lists=$cache/apt/lists")
apt-get "${apt_options[@]}" update -qq >&2
cd "$cache/src"
if ! compgen -G "kubernetes-*/Makefile" > /dev/null; then
  apt-get "${apt_options[@]}" source kubernetes >&2
fi
cd "$(compgen -G "kubernetes-*/Makefile" | head -n 1 | xargs dirname)"

# The tree vendors reflect2 v1.0.1, whose map iteration crashes the API server (SIGSEGV in
# aeshashbody) when built with Go 1.18 or newer, as Debian's 1.19 is: the first custom resource
# written brings it down. v1.0.2 fixed that, with the same API; Debian ships it.
rsync -a --delete --exclude go.mod --exclude "*_test.go" \
  /usr/share/gocode/src/github.com/modern-go/reflect2/ vendor/github.com/modern-go/reflect2/

# Plain `go build` fails on this tree; its own make works with these variables unset.
env -u GOPATH -u GOFLAGS -u GO111MODULE CGO_ENABLED=0 \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
mkdir -p "$bin"
for binary in kube-apiserver kube-controller-manager; do  # renamed into place: one may be running
  cp "_output/bin/$binary" "$bin/$binary.new"
  mv -f "$bin/$binary.new" "$bin/$binary"
done
echo "$recipe" > "$bin/recipe"
echo "$bin"
