#!/usr/bin/env bash
# Builds a real kube-apiserver and kube-controller-manager (Kubernetes v1.20.2) from Debian
# bookworm's source package, for the tests that need a Kubernetes API server. No registry ships
# these binaries; Debian's source tree carries its vendored dependencies, so the build needs only
# Debian's Go. The result is cached outside the checkout: a second run on the same machine only
# prints the directory. Needs root (apt-get). Prints the directory holding the binaries.
# Also installs etcd (Debian's etcd-server), which the test fixture starts beside them.
set -euo pipefail

cache="${TUNEFLEET_KUBE_CACHE:-/var/cache/tunefleet-kube}"
bin="$cache/bin"
export DEBIAN_FRONTEND=noninteractive
if ! command -v etcd > /dev/null; then
  apt-get install -y -qq --no-install-recommends etcd-server >&2
fi
if [[ -x "$bin/kube-apiserver" && -x "$bin/kube-controller-manager" ]]; then
  echo "$bin"
  exit 0
fi

apt-get install -y -qq --no-install-recommends golang-go rsync make dpkg-dev >&2

# A private apt configuration that adds the deb-src line, leaving the system's untouched.
mkdir -p "$cache/apt/lists/partial" "$cache/src"
echo "deb-src http://deb.debian.org/debian bookworm main" > "$cache/apt/sources.list"
apt_options=(-o "Dir::Etc::SourceList=$cache/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
             -o "Dir::State::Lists=$cache/apt/lists")
apt-get "${apt_options[@]}" update -qq >&2
cd "$cache/src"
if ! compgen -G "kubernetes-*/Makefile" > /dev/null; then
  apt-get "${apt_options[@]}" source kubernetes >&2
fi
cd "$(compgen -G "kubernetes-*/Makefile" | head -n 1 | xargs dirname)"

# Plain `go build` fails on this tree; its own make works with these variables unset.
env -u GOPATH -u GOFLAGS -u GO111MODULE CGO_ENABLED=0 \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
mkdir -p "$bin"
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$bin/"
echo "$bin"
