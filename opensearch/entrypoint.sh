#!/bin/sh
# OpenSearch's start in its container (opensearch/Dockerfile), as scripts/backends.py's
# start_opensearch does on the host: the launcher's JVM options, then the arguments (-Ekey=value
# settings over the mounted config/opensearch.yml).
set -eu
home=/usr/share/opensearch
# The options are split into words on purpose.
# shellcheck disable=SC2086
exec java $OPENSEARCH_JVM_OPTIONS -Djava.io.tmpdir=/tmp \
    -Dopensearch.path.home="$home" -Dopensearch.path.conf="$home/config" \
    -cp "$home/lib/*" org.opensearch.bootstrap.OpenSearch "$@"
