#!/usr/bin/env bash
# Installs what the real-cluster tests need (SLURM daemons + clients, iproute2), only if missing.
# Idempotent: a second run does nothing. Needs root and access to the Debian/Ubuntu archive.
set -euo pipefail

need=()
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld slurmd slurm-client)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -eq 0 ]; then
    echo "install_slurm.sh: nothing to install"
    exit 0
fi

# The packages' postinst scripts would start system-wide slurmctld/slurmd on the default ports with
# /etc/slurm/slurm.conf; the tests run their own daemons, so keep the system ones from starting.
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    own_policy=1
fi
cleanup() { if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
echo "install_slurm.sh: installed ${need[*]}"
