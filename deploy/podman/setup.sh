#!/usr/bin/env bash
# Prepare this machine for `make test-deploy`: podman, debootstrap and nginx
# from apt if missing, then a local Debian bookworm base image (python3, venv,
# pip) made with debootstrap, because no image registry is reachable here.
# The base trusts the host's extra CA certificates, so pip inside a build goes
# out through the same network as the host's pip.
set -euo pipefail
BASE_IMAGE=${BASE_IMAGE:-localhost/distill-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

missing=()
for tool in podman:podman debootstrap:debootstrap nginx:nginx runc:runc; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool##*:}")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
fi

started=$(date +%s)
if podman image exists "$BASE_IMAGE"; then
    echo "base image $BASE_IMAGE present"
    exit 0
fi
rootfs=$(mktemp -d /var/tmp/distill-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm into $rootfs"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$MIRROR" >/dev/null
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
fi
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
tar -C "$rootfs" -c . | podman import -q --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
echo "base image $BASE_IMAGE made in $(($(date +%s) - started)) s"
