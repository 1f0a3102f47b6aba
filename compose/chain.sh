#!/bin/sh
# ./chain.sh up|down: the compose chain, plus what Docker needs to let an SI route between
# internal networks (the role of the network policy in Contrail): Docker drops bridged
# packets whose source or destination is outside an internal network's subnet, which is
# every packet an SI forwards; DOCKER-USER is consulted first.
set -eu
cd "$(dirname "$0")"
compose() {
    if docker compose version >/dev/null 2>&1; then docker compose "$@"; else docker-compose "$@"; fi
}
policy() {
    for bridge in dnfv-left dnfv-right; do
        iptables -C DOCKER-USER -i "$bridge" -o "$bridge" -j ACCEPT 2>/dev/null && [ "$1" = -I ] && continue
        iptables "$1" DOCKER-USER -i "$bridge" -o "$bridge" -j ACCEPT 2>/dev/null || true
    done
}
case "${1:-}" in
    up) compose up -d && policy -I ;;
    down) policy -D; compose down -v ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
