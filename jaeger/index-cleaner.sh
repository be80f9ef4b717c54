#!/bin/sh
# The retention of the fleet's OpenSearch indices under Docker Compose (docker-compose.fleet.yml,
# service index-cleaner; docs/scale.md, "Retention"): Jaeger's es-index-cleaner once at start,
# then every day at 00:05 UTC, as `scripts/backends.py run --fleet --opensearch` runs it
# (IndexCleaner there). A shell loop and not the host's cron, so that `up` brings the retention
# with the store and `down` stops it; busybox's sh, in the image scripts/compose.py builds.
#
#   STEPSPAN_RETENTION_DAYS   the days kept, today included (default 7; at least 1)
#   STEPSPAN_OPENSEARCH_URLS  the nodes, as jaeger/opensearch.yaml takes them ("[url, url]");
#                             the first that answers is used
#   STEPSPAN_INDEX_CLEANER    Jaeger's es-index-cleaner (default: where the image puts it)
#
# A setting it refuses (STEPSPAN_RETENTION_DAYS not a whole number of days, or under 1; no
# URL) is said once on stderr, and the script then waits, deleting nothing, until it is
# stopped: the service's health check (it reads the word the script writes to a file) fails,
# so `docker compose up --wait` stops with index-cleaner unhealthy and `logs index-cleaner`
# says why, where an exit would only restart it in a loop.
#
# It logs to stdout the cleaner's own JSON lines (the cutoff, the indices deleted) and, per run,
# "index cleaner (keeps N days, <url>): deleted K indices: <names>", or what failed (then it
# tries again an hour later). SIGTERM ends it at once, a run under way too: `docker compose down` needs no
# kill timeout.

CLEANER="${STEPSPAN_INDEX_CLEANER:-/go/bin/es-index-cleaner-linux}"
RUN_AT_S=300          # 00:05 UTC, in seconds after midnight: just after a new day's indices begin
RETRY_S=3600          # after a failed run
STATE="${TMPDIR:-/tmp}"
SETTINGS="$STATE/index-cleaner.settings"  # "accepted" or "refused": what the health check reads
DAYS="${STEPSPAN_RETENTION_DAYS:-7}"
URLS=$(echo "${STEPSPAN_OPENSEARCH_URLS:-}" | tr '[],' '   ')
URLS=$(echo $URLS)  # one space between URLs

child=""
stop() {
  [ -n "$child" ] && kill "$child" 2>/dev/null
  exit 0
}
trap stop TERM INT

# A refused setting: said once, then nothing but waiting to be stopped (see the top).
refuse() {
  echo refused >"$SETTINGS"
  echo "index cleaner: $1; nothing is deleted until it is set right and the service started again" >&2
  while true; do
    interruptible sleep 3600
  done
}

# Runs a command in the background and waits for it, so that a trapped signal is handled at
# once (sh runs a trap only after a foreground command ends); the command's status.
interruptible() {
  "$@" &
  child=$!
  wait "$child"
  status=$?
  child=""
  return "$status"
}

case "$DAYS" in
  '' | *[!0-9]*) refuse "STEPSPAN_RETENTION_DAYS must be a whole number of days, not '$DAYS'" ;;
esac
[ "$DAYS" -ge 1 ] || refuse "STEPSPAN_RETENTION_DAYS must be at least 1 (today's indices), not $DAYS"
[ -n "$URLS" ] || refuse "STEPSPAN_OPENSEARCH_URLS names no node"
echo accepted >"$SETTINGS"

# One run against the first node that takes it: 0 when one did.
clean_once() {
  for url in $URLS; do
    interruptible "$CLEANER" "$DAYS" "$url" >"$STATE/index-cleaner.out" 2>&1
    status=$?
    if [ "$status" -eq 0 ]; then
      cat "$STATE/index-cleaner.out"
      # The names in its line "Deleting indices" (its line "Queried indices" names every one).
      names=$(grep '"msg":"Deleting indices"' "$STATE/index-cleaner.out" | grep -o '"Index":"[^"]*"' |
        sed 's/"Index":"//; s/"$//' | sort)
      count=$(echo "$names" | grep -c .)
      listed=$(echo $names | sed 's/ /, /g')
      echo "index cleaner (keeps $DAYS days, $url): deleted $count indices${listed:+: $listed}"
      return 0
    fi
    echo "index cleaner: $url failed (exit $status): $(tail -n 1 "$STATE/index-cleaner.out")"  # not its usage text
  done
  echo "index cleaner: failed on every node, trying again in at most $((RETRY_S / 3600)) h"
  return 1
}

# Seconds from now to the next 00:05 UTC.
until_next_run() {
  now=$(date -u +%s)
  at=$((now / 86400 * 86400 + RUN_AT_S))
  [ "$at" -gt "$now" ] || at=$((at + 86400))
  echo $((at - now))
}

echo "index cleaner: keeps $DAYS days of Jaeger's daily indices, at start and daily at 00:05 UTC ($URLS)"
while true; do
  clean_once
  succeeded=$?
  wait_s=$(until_next_run)
  if [ "$succeeded" -ne 0 ] && [ "$wait_s" -gt "$RETRY_S" ]; then wait_s=$RETRY_S; fi
  interruptible sleep "$wait_s"
done
