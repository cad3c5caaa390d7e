#!/bin/sh
# Entrypoint of the redis:7 stand-in. It does what the official image's entrypoint does:
# - `redis-server` without a config file that sets protected-mode: protected mode off.
#   A Redis without a password in protected mode refuses every client that is not on
#   loopback ("DENIED Redis is running in protected mode"), and the examhook containers
#   reach it over the compose network. (It is not published on the host.)
# - started as root: /data made the redis user's, then the server runs as that user.
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
	set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
	protect=yes
	config=
	if [ -f "${2:-}" ]; then
		config="$2"
		if grep -q '^protected-mode' "$config"; then protect=; fi
	fi
	if [ "$protect" ]; then
		shift
		if [ "$config" ]; then shift; fi
		set -- --protected-mode no "$@"
		if [ "$config" ]; then set -- "$config" "$@"; fi
		set -- redis-server "$@"
	fi
	umask 0077
	if [ "$(id -u)" = 0 ]; then
		find . \! -user redis -exec chown redis '{}' +
		exec setpriv --reuid=redis --regid=redis --init-groups "$@"
	fi
fi
exec "$@"
