#!/usr/bin/env bash
# Run a command in a private network namespace whose only interface is loopback (127.0.0.1).
# Used for the Ray cluster tests: Ray binds its nodes to the machine's interface address even when told
# 127.0.0.1; in this namespace there is no other interface, so all cluster traffic stays on loopback.
# Needs root (`unshare -n`) or unprivileged user namespaces (`unshare -rn`); otherwise it says so and fails.
set -euo pipefail
if unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
elif unshare -rn true 2>/dev/null; then
  exec unshare -rn sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
echo "loopback_netns.sh: cannot create a network namespace (needs root or user namespaces); not running: $*" >&2
exit 1
