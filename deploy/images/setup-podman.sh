#!/usr/bin/env bash
# Installs and configures podman for `make images` / `make images-test` when missing (Debian bookworm).
#
# Debian's podman defaults to crun, which fails on hosts with cgroup v1 and a hybrid v2 mount, and to
# ulimits a root without CAP_SYS_RESOURCE cannot raise: /etc/containers/containers.conf is written
# (runc, cgroupfs, explicit ulimits) only when it does not exist yet, so a configured host is left alone.
set -euo pipefail

SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
need=()
for tool in podman buildah runc mmdebstrap catatonit; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "images: installing ${need[*]} (Debian)"
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman buildah runc mmdebstrap catatonit fuse-overlayfs uidmap slirp4netns netavark aardvark-dns \
    containernetworking-plugins >/dev/null
fi

conf=/etc/containers/containers.conf
if [ ! -s "$conf" ]; then
  echo "images: writing $conf (runc, cgroupfs, explicit ulimits)"
  $SUDO mkdir -p /etc/containers
  $SUDO tee "$conf" >/dev/null <<'CONF'
# Written by deploy/images/setup-podman.sh (make images): crun fails on this cgroup layout, and
# podman's default ulimits need CAP_SYS_RESOURCE.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi
podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Store.GraphDriverName}}' >/dev/null
