#!/bin/sh
# Kafka's start in its container (kafka/Dockerfile), as scripts/backends.py's start_kafka does
# on the host: the first start formats the log folder (log.dirs of the config) for a new
# cluster; later starts find meta.properties there and keep every topic, record and offset.
set -eu
config=/etc/kafka/server.properties
classpath="/opt/kafka/libs/*"
data=$(sed -n 's/^log\.dirs=//p' "$config")
if [ ! -f "$data/meta.properties" ]; then
    cluster_id=$(java -cp "$classpath" kafka.tools.StorageTool random-uuid | tail -n 1)
    java -cp "$classpath" kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$config"
fi
# KAFKA_JVM_OPTIONS is split into words on purpose.
# shellcheck disable=SC2086
exec java $KAFKA_JVM_OPTIONS -Dlog4j2.configurationFile=/etc/kafka/log4j2.properties \
    -cp "$classpath" kafka.Kafka "$config"
