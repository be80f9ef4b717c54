#!/usr/bin/env python3
"""Build and run the project's real backends without Docker.

The OpenTelemetry Collector (built with the Collector Builder, ocb, from
collector/builder-config.yaml), Jaeger v2 (cmd/jaeger) and Prometheus (cmd/prometheus, the
store behind Jaeger's Monitor tab) are built from their Go modules, through the Go module
proxy, into a cache directory outside git:

    ${OTEL_STEPSPAN_BACKENDS_DIR:-~/.cache/otel_stepspan/backends}/<component>-<version>/

The versions come from ONE place: the image tags in docker-compose.yml
(otel/opentelemetry-collector-contrib:<X>, jaegertracing/jaeger:<Y>, prom/prometheus:v<Z>).
collector/builder-config.yaml is checked against the collector tag.
The search front (jaeger/search_front, this repository's own Go program, standard library only)
is built from its source into search-front-<source hash>/ there, so an edit rebuilds it; it
stands on Jaeger's UI port in front of Jaeger's query port (`run` and LocalBackends too).

CLI (stdlib only, Python >= 3.10):
    python scripts/backends.py build      # build what is missing, print the paths
    python scripts/backends.py build --fleet   # ... and the fleet Collector (agent, gateway),
                                          # Jaeger's es-index-cleaner, and Kafka's and
                                          # OpenSearch's jars (Maven) when java and mvn are there
    python scripts/backends.py paths      # print the paths (and whether built), build nothing
    python scripts/backends.py validate   # `otelcol validate` on every collector config
                                          # (--fleet: agent.yaml, gateway.yaml, the Kafka
                                          # overlays gateway-kafka.yaml and ingester.yaml too)
    python scripts/backends.py secrets    # CA, server certificate, token in collector/secrets/
    python scripts/backends.py run [--secured] [--data-dir DIR]
                                          # Jaeger (Badger) + collector + Prometheus on 127.0.0.1;
                                          # Ctrl-C stops; spans, the collector's queue and the
                                          # metrics stay in DIR
    python scripts/backends.py run --fleet [--kafka] [--opensearch]
                                          # agent + gateways instead of the collector; --kafka:
                                          # Kafka between the gateways and Jaeger (docs/scale.md);
                                          # --opensearch: Jaeger on two OpenSearch nodes, old
                                          # days deleted (--retention-days, default 7)

From Python (e.g. pytest):
    paths = ensure_built()                      # {"otelcol": Path, "jaeger": Path, "prometheus": Path}
    with LocalBackends(workdir) as stack: ...   # all three on free ports, state under workdir;
                                                # stop, kill (SIGKILL) and start each again
    write_local_collector_config(src, dst, ...) # the project's config, local endpoints only
                                                # (collector/gateway.yaml too)
    ensure_built(("otelcol_gateway",))          # the fleet Collector (docs/scale.md), on demand
    write_local_agent_config(src, dst, ...)     # collector/agent.yaml, local endpoints and gateways
    LocalFleet(workdir, kafka=True)             # ... with Kafka; start_kafka(), stop and kill it
    fetch_kafka()                               # Kafka's jars (Maven Central), on demand
    LocalFleet(workdir, opensearch=True)        # Jaeger on two OpenSearch nodes; start_opensearch()
    fetch_opensearch()                          # OpenSearch's jars (Maven Central), on demand

Findings that shaped this script (Go 1.26, proxy as seen 2026-11):
  * Collector: `go install go.opentelemetry.io/collector/cmd/builder@v0.165.0` works; ocb
    then resolves and builds the components (statically linked). v0.165.0 is the newest
    release at which the proxy serves every component used (prometheusexporter,
    filestorage and bearertokenauthextension included; contrib also has v0.165.1, core
    does not).
  * Jaeger v2 is not a /v2 module: release v2.13.0 is the Go module
    github.com/jaegertracing/jaeger v1.76.0 (v2.N.P <-> v1.(N+63).P; the module's
    CHANGELOG.md line "v1.76.0 / v2.13.0" is checked). `go install
    github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0` FAILS: "The go.mod file for the
    module providing named packages contains one or more replace directives" (it replaces
    github.com/Shopify/sarama). Working form: a throw-away module that copies Jaeger's
    replace directives, `go get github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0`, then
    `go build ... github.com/jaegertracing/jaeger/cmd/jaeger` (CGO_ENABLED=0: static, so it
    runs alone in an image built FROM scratch). Jaeger's own go.sum must be
    copied into it first: without it, `go get` fails with "verifying module: ... reading
    .../sumdb/sum.golang.org/lookup/...: 404 Not Found" for several collector v0.140
    modules (the checksum database is not reachable for them here); with Jaeger's go.sum
    the hashes are checked against Jaeger's pinned sums instead.
  * A Jaeger built from the Go module serves a placeholder page instead of the real UI
    (the UI assets are a git submodule built only for release images). The query APIs
    (/api/v3/*, /api/*) are complete.
  * Docker Compose v2 (scripts/compose.py) is built the same way: its go.mod has an
    exclude block, which `go install` refuses as it refuses replace directives.
  * The fleet Collector (collector/gateway-builder-config.yaml: load_balancing, tail_sampling,
    kafka, forward) cannot be built at v0.165.0: the proxy answers 403 for
    loadbalancingexporter v0.162.0 to v0.165.1. v0.161.0 (core v1.67.0) builds, with three
    replaces for modules the proxy does not serve at the versions v0.161.0 asks for
    (aws-sdk-go-v2/service/servicediscovery v1.46.1, contrib pkg/kafka/configkafka v0.157.0,
    pkg/kafka/topic v0.155.0). Its release is pinned by the manifest's dist.version; it is built
    only when asked (`build --fleet`).
  * Prometheus v3.X.Y is the Go module github.com/prometheus/prometheus v0.(300+X).Y (no /v3
    path); `go list -m -versions` lists up to v0.316.0 (3.16.0, pinned and built here; the
    module's VERSION file is checked). Built the same way (no replace directives, but the same throw-away module
    keeps one path for all three), with -tags remove_all_sd: cold, about 45 s of downloads and
    2 min 45 s of compiling on 2 cores (after the Collector and Jaeger, whose Go build cache
    it shares); 50 MiB. Without the builtinassets tag its web UI pages are absent; the HTTP
    API (/api/v1/*), which Jaeger's Monitor tab queries, is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COLLECTOR_DIR = REPO_ROOT / "collector"
COLLECTOR_CONFIG = COLLECTOR_DIR / "config.yaml"
SECURED_CONFIG = COLLECTOR_DIR / "secured.yaml"
SECRETS_DIR = COLLECTOR_DIR / "secrets"
JAEGER_CONFIG = REPO_ROOT / "jaeger" / "config.yaml"
# The search front (jaeger/search_front/main.go): Jaeger's query port with the UI's trace
# search made exact per span; built from this source, no module outside the standard library.
SEARCH_FRONT_DIR = REPO_ROOT / "jaeger" / "search_front"
# Its image in docker-compose.yml: no registry holds it; scripts/compose.py imports the Go-built
# binary under this tag, and `docker compose up` builds jaeger/search_front/Dockerfile without it.
SEARCH_FRONT_IMAGE = "otel_stepspan/search-front:local"
PROMETHEUS_CONFIG = REPO_ROOT / "prometheus" / "prometheus.yml"
# The fleet's: one job scraping every gateway's span metrics (docs/scale.md).
PROMETHEUS_FLEET_CONFIG = REPO_ROOT / "prometheus" / "prometheus-fleet.yml"
BUILDER_CONFIG = COLLECTOR_DIR / "builder-config.yaml"
# The fleet tier (docs/scale.md): agents load-balance by trace id onto gateways that make span
# metrics and tail-sample. One more Collector build, at its own release (pinned in its
# manifest's dist.version), made only when asked: `build --fleet`, ensure_built(("otelcol_gateway",)).
GATEWAY_BUILDER_CONFIG = COLLECTOR_DIR / "gateway-builder-config.yaml"
AGENT_CONFIG = COLLECTOR_DIR / "agent.yaml"
GATEWAY_CONFIG = COLLECTOR_DIR / "gateway.yaml"
# Kafka between the gateways and Jaeger (docs/scale.md): the gateways write the traces they keep
# to one topic (collector/gateway-kafka.yaml, an overlay on gateway.yaml) and Jaeger ingests it
# (jaeger/ingester.yaml, an overlay on jaeger/config.yaml). Kafka itself runs from Maven
# Central's jars on the machine's Java, fetched with Maven into the cache (fetch_kafka).
GATEWAY_KAFKA_CONFIG = COLLECTOR_DIR / "gateway-kafka.yaml"
JAEGER_INGESTER_CONFIG = REPO_ROOT / "jaeger" / "ingester.yaml"
KAFKA_CONFIG = REPO_ROOT / "kafka" / "server.properties"
KAFKA_LOG4J_CONFIG = REPO_ROOT / "kafka" / "log4j2.properties"
# The Kafka release, pinned HERE (4.1.1: run here as a single KRaft node; Maven Central serves
# 4.0.0 to 4.4.0). log4j-core comes with it at KAFKA_LOG4J_VERSION, and the SLF4J binding Kafka
# leaves out must be that same version: fetch_kafka checks it.
KAFKA_VERSION = "4.1.1"
KAFKA_LOG4J_VERSION = "2.24.3"
KAFKA_ARTIFACTS = ("org.apache.kafka:kafka_2.13", "org.apache.kafka:kafka-server",
                   "org.apache.kafka:kafka-storage", "org.apache.kafka:kafka-tools")
MAVEN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
# What the overlays name (printed by `run --fleet --kafka`; tests check the files say the same).
KAFKA_TOPIC = "otel-stepspan-spans"
KAFKA_GROUP = "otel-stepspan-jaeger"
# The variable both overlays read their brokers from (host:port, comma-separated).
ENV_KAFKA_BROKERS = "STEPSPAN_KAFKA_BROKERS"
# The broker's JVM: a modest heap (it keeps its data in the OS page cache, not on the heap).
KAFKA_JVM_OPTIONS = ("-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true")

# OpenSearch as the fleet's Jaeger store (docs/scale.md): three nodes from Maven Central's jars on
# the machine's Java 17, fetched with Maven into the cache (fetch_opensearch), Jaeger pointed at
# them by jaeger/opensearch.yaml (jaeger/config.yaml with OpenSearch for Badger). 2.19.6 is the newest 2.x
# Maven Central serves; 3.x needs Java 21. log4j-core is not in OpenSearch's published
# dependencies: it is added at the log4j-api version OpenSearch brings (fetch_opensearch checks).
OPENSEARCH_VERSION = "2.19.6"
OPENSEARCH_LOG4J_VERSION = "2.25.4"
OPENSEARCH_DIR = REPO_ROOT / "opensearch"
OPENSEARCH_CONFIG = OPENSEARCH_DIR / "opensearch.yml"
OPENSEARCH_LOG4J_CONFIG = OPENSEARCH_DIR / "log4j2.properties"
OPENSEARCH_NETTY_POLICY = OPENSEARCH_DIR / "transport-netty4.policy"
JAEGER_OPENSEARCH_CONFIG = REPO_ROOT / "jaeger" / "opensearch.yaml"
# The variable jaeger/opensearch.yaml reads the nodes' URLs from (a YAML list).
ENV_OPENSEARCH_URLS = "STEPSPAN_OPENSEARCH_URLS"
# Retention of those indices: Jaeger's es-index-cleaner (build_es_index_cleaner), run by `run
# --fleet --opensearch` at start and every day at INDEX_CLEANER_UTC (IndexCleaner), keeps this
# many days (today included); --retention-days or this variable sets it.
ENV_RETENTION_DAYS = "STEPSPAN_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 7
INDEX_CLEANER_UTC = (0, 5)  # hour, minute: just after a new day's indices begin
INDEX_CLEANER_RETRY_S = 3600.0  # after a failed run (no node answered), the next try
# The node's JVM: what OpenSearch's own launcher (bin/opensearch, config/jvm.options) passes,
# with a small heap (290-380 MB RSS measured at 512 MB).
OPENSEARCH_JVM_OPTIONS = (
    "-Xms256m", "-Xmx512m", "-XX:+UseG1GC", "-Djava.awt.headless=true", "-Dfile.encoding=UTF-8",
    "-Djna.nosys=true", "-XX:-OmitStackTraceInFastThrow", "-Dio.netty.noUnsafe=true",
    "-Dio.netty.noKeySetOptimization=true", "-Dio.netty.recycler.maxCapacityPerThread=0",
    "-Dio.netty.allocator.numDirectArenas=0", "-Dlog4j.shutdownHookEnabled=false",
    "-Dlog4j2.disable.jmx=true", "-Djava.locale.providers=SPI,COMPAT",
    "-Dopensearch.distribution.type=tar")

COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib"
JAEGER_IMAGE = "jaegertracing/jaeger"
OCB_MODULE = "go.opentelemetry.io/collector/cmd/builder"
JAEGER_MODULE = "github.com/jaegertracing/jaeger"
JAEGER_PACKAGE = JAEGER_MODULE + "/cmd/jaeger"
# Jaeger's own index cleaner, from the same module at the same release: it deletes the daily
# indices of jaeger/opensearch.yaml created before a cutoff (docs/scale.md, retention).
ES_INDEX_CLEANER_PACKAGE = JAEGER_MODULE + "/cmd/es-index-cleaner"
# Jaeger releases v2.N.P as Go module tag v1.(N+63).P (v2.1.0 = v1.64.0, v2.13.0 = v1.76.0).
JAEGER_V1_OFFSET = 63
PROMETHEUS_IMAGE = "prom/prometheus"
PROMETHEUS_MODULE = "github.com/prometheus/prometheus"
PROMETHEUS_PACKAGE = PROMETHEUS_MODULE + "/cmd/prometheus"
# Prometheus's own build tags: every service-discovery plugin out (plugins/plugin_*.go: the
# cloud SDKs, Kubernetes' client); static_configs, file and http discovery stay
# (plugins/minimum.go), and static targets are all prometheus/prometheus.yml uses. No
# builtinassets tag: the web UI's assets are not embedded, the HTTP API (what Jaeger uses) is.
PROMETHEUS_BUILD_TAGS = "remove_all_sd"

ENV_BACKENDS_DIR = "OTEL_STEPSPAN_BACKENDS_DIR"
ENV_GO = "OTEL_STEPSPAN_GO"
LOCALHOST = "127.0.0.1"


class BackendError(RuntimeError):
    """A backend could not be built, configured or started."""


def _log(msg: str) -> None:
    print(f"[backends] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- versions


@dataclass(frozen=True)
class Versions:
    collector: str  # "0.155.0": image tag and ocb/component version without the "v"
    jaeger: str  # "2.13.0": Jaeger release (image tag)
    prometheus: str  # "3.16.0": Prometheus release (image tag)

    @property
    def jaeger_module(self) -> str:
        """Go module version of the Jaeger release (v2.13.0 -> v1.76.0)."""
        m = re.fullmatch(r"2\.(\d+)\.(\d+)", self.jaeger)
        if not m:
            raise BackendError(f"unexpected Jaeger v2 version {self.jaeger!r} in {COMPOSE_FILE}")
        return f"v1.{int(m.group(1)) + JAEGER_V1_OFFSET}.{m.group(2)}"

    @property
    def prometheus_module(self) -> str:
        """Go module version of the Prometheus release (vX.Y.Z -> v0.(X*100+Y).Z: v3.16.0 ->
        v0.316.0; the module cannot carry a /v3 suffix, so releases are spelled this way)."""
        m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", self.prometheus)
        if not m:
            raise BackendError(f"unexpected Prometheus version {self.prometheus!r} in {COMPOSE_FILE}")
        return f"v0.{int(m.group(1)) * 100 + int(m.group(2))}.{m.group(3)}"


def _image_tag(text: str, image: str) -> str:
    m = re.search(r"^\s*image:\s*[\"']?" + re.escape(image) + r":([^\s\"'@]+)", text, re.M)
    if not m:
        raise BackendError(f"{COMPOSE_FILE}: no `image: {image}:<tag>` line")
    return m.group(1)


def pinned_versions(compose_file: Path = COMPOSE_FILE) -> Versions:
    """The pinned versions: the image tags in docker-compose.yml."""
    text = compose_file.read_text(encoding="utf-8")
    v = Versions(
        collector=_image_tag(text, COLLECTOR_IMAGE).lstrip("v"),
        jaeger=_image_tag(text, JAEGER_IMAGE).lstrip("v"),
        prometheus=_image_tag(text, PROMETHEUS_IMAGE).lstrip("v"),
    )
    _check_builder_config(v)
    return v


def _check_builder_config(v: Versions) -> None:
    """Every v0.x component in builder-config.yaml must be the compose collector version."""
    text = BUILDER_CONFIG.read_text(encoding="utf-8")
    dist = re.search(r"^\s*version:\s*[\"']?v?([^\s\"']+)", text, re.M)
    if dist and dist.group(1) != v.collector:
        raise BackendError(
            f"{BUILDER_CONFIG}: dist version {dist.group(1)} != {COLLECTOR_IMAGE}:{v.collector}"
        )
    for module, ver in re.findall(r"gomod:\s*(\S+)\s+(v0\.\S+)", text):
        if ver != "v" + v.collector:
            raise BackendError(
                f"{BUILDER_CONFIG}: {module} {ver} does not match {COLLECTOR_IMAGE}:{v.collector}"
            )


def _builder_dist(text: str, manifest: Path = BUILDER_CONFIG) -> tuple[str, str]:
    """(name, output_path) of the ocb manifest's dist section."""
    name = re.search(r"^\s+name:\s*[\"']?([^\s\"']+)", text, re.M)
    out = re.search(r"^\s+output_path:\s*[\"']?([^\s\"']+)", text, re.M)
    if not name or not out:
        raise BackendError(f"{manifest}: dist.name and dist.output_path are required")
    return name.group(1), out.group(1)


def gateway_version(manifest: Path = GATEWAY_BUILDER_CONFIG) -> str:
    """The fleet Collector's release ("0.161.0"): its manifest's dist.version, which every v0.x
    component of it must name too (the manifest is where this release is pinned)."""
    text = manifest.read_text(encoding="utf-8")
    dist = re.search(r"^\s*version:\s*[\"']?v?([^\s\"']+)", text, re.M)
    if not dist:
        raise BackendError(f"{manifest}: dist.version is required")
    version = dist.group(1)
    for module, ver in re.findall(r"gomod:\s*(\S+)\s+(v0\.\S+)", text):
        if ver != "v" + version:
            raise BackendError(f"{manifest}: {module} {ver} does not match dist.version {version}")
    return version


# --------------------------------------------------------------------------- paths


def backends_dir() -> Path:
    env = os.environ.get(ENV_BACKENDS_DIR)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "otel_stepspan" / "backends"


def binary_paths(versions: Versions | None = None) -> dict[str, Path]:
    """Where the binaries are (or will be) for the pinned versions; builds nothing."""
    v = versions or pinned_versions()
    name, out = _builder_dist(BUILDER_CONFIG.read_text(encoding="utf-8"))
    root = backends_dir()
    return {
        "otelcol": (root / f"otelcol-{v.collector}" / out / name).resolve(),
        "jaeger": root / f"jaeger-{v.jaeger}-static" / "jaeger",
        "es_index_cleaner": root / f"jaeger-es-index-cleaner-{v.jaeger}-static" / "es-index-cleaner",
        "prometheus": root / f"prometheus-{v.prometheus}-static" / "prometheus",
        # keyed by the source's hash: an edit of the program builds a new binary
        "search_front": root / f"search-front-{search_front_digest()[:12]}" / "search-front",
        "otelcol_gateway": gateway_binary_path(),
    }


def gateway_binary_path() -> Path:
    """Where the fleet Collector (agent and gateway) is, or will be; builds nothing."""
    name, out = _builder_dist(GATEWAY_BUILDER_CONFIG.read_text(encoding="utf-8"), GATEWAY_BUILDER_CONFIG)
    return (backends_dir() / f"otelcol-gateway-{gateway_version()}" / out / name).resolve()


def find_go() -> str:
    """The go command: $OTEL_STEPSPAN_GO, PATH, or the usual install locations."""
    candidates = [os.environ.get(ENV_GO), shutil.which("go"), "/usr/local/go/bin/go",
                  str(Path.home() / "go" / "bin" / "go"), "/usr/lib/go/bin/go"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise BackendError(
        "Go toolchain not found: building the OpenTelemetry Collector and Jaeger needs Go "
        ">= 1.25 (https://go.dev/doc/install) on PATH, or set OTEL_STEPSPAN_GO=/path/to/go. "
        "Alternatively run the backends with `docker compose up`."
    )


def _go_env(go: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(go).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GOFLAGS", "-buildvcs=false")
    env["GO111MODULE"] = "on"
    env.pop("GOWORK", None)
    if extra:
        env.update(extra)
    return env


def _run(argv: list[str], *, cwd: Path, env: Mapping[str, str], what: str) -> str:
    _log(f"$ {' '.join(argv)}   (in {cwd})")
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-40:])
        raise BackendError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise builds of one component across processes (pytest-xdist, two shells)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no locking
            pass
        yield


def _sha256(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- builds


def _build_with_ocb(manifest: Path, version: str, workdir: Path, binary: Path, what: str,
                    force: bool) -> Path:
    """Build ``binary`` with ocb v``version`` from ``manifest`` in ``workdir`` (if missing, or
    built from another manifest: its sha256 is kept beside the binary); one build at a time
    across processes (a lock file beside ``workdir``)."""
    stamp = workdir / "builder-config.sha256"
    digest = _sha256(manifest)
    with _lock(workdir.with_name(workdir.name + ".lock")):
        if not force and binary.is_file() and stamp.is_file() and stamp.read_text() == digest:
            return binary
        go = find_go()
        workdir.mkdir(parents=True, exist_ok=True)
        bindir = workdir / "bin"
        ocb = bindir / "builder"
        env = _go_env(go, {"GOBIN": str(bindir)})
        t0 = time.monotonic()
        if not ocb.is_file():
            _log(f"installing ocb {OCB_MODULE}@v{version} into {bindir}")
            _run([go, "install", f"{OCB_MODULE}@v{version}"], cwd=workdir, env=env,
                 what=f"go install ocb v{version}")
        _log(f"building {what} v{version} with ocb from {manifest.name} "
             f"(downloads, then a few minutes of compiling on 2 cores)")
        # ocb writes dist.output_path relative to its working directory: the cache dir.
        _run([str(ocb), f"--config={manifest}"], cwd=workdir, env=env, what=f"ocb build of {manifest.name}")
        if not binary.is_file():
            raise BackendError(f"ocb finished but {binary} is missing")
        stamp.write_text(digest)
        _log(f"{what} built in {time.monotonic() - t0:.0f}s: {binary} "
             f"({binary.stat().st_size / 2**20:.1f} MiB)")
    return binary


def build_collector(versions: Versions | None = None, *, force: bool = False) -> Path:
    """Build the collector with ocb from collector/builder-config.yaml (if missing/stale)."""
    v = versions or pinned_versions()
    return _build_with_ocb(BUILDER_CONFIG, v.collector, backends_dir() / f"otelcol-{v.collector}",
                           binary_paths(v)["otelcol"], "the collector", force)


def build_gateway(*, force: bool = False) -> Path:
    """Build the fleet Collector (collector/agent.yaml and collector/gateway.yaml run it) with
    ocb from collector/gateway-builder-config.yaml, at the release its dist.version pins (if
    missing/stale). Only when asked: nothing of the single-collector setup needs it.

    Why its own release (Go 1.26, proxy as seen 2026-12): the proxy answers 403 for the
    load_balancing exporter v0.162.0 to v0.165.1, so no release the v0.165.0 build could share
    has it; v0.161.0 (core v1.67.0) builds with the three replaces in the manifest, cold in
    about 4 minutes of compiling on 2 cores after the downloads; about 90 MB."""
    version = gateway_version()
    try:
        return _build_with_ocb(GATEWAY_BUILDER_CONFIG, version, backends_dir() / f"otelcol-gateway-{version}",
                               gateway_binary_path(), "the fleet collector (agent, gateway)", force)
    except BackendError as e:
        raise BackendError(
            f"{e}\nThe fleet Collector's modules come from the Go module proxy at the versions "
            f"{GATEWAY_BUILDER_CONFIG} pins (dist.version, and its replaces). A '403 Forbidden', "
            f"'404 Not Found' or 'unknown revision' above names a module the proxy does not serve at "
            f"the version asked: pin one it serves with a replaces line, or move every component "
            f"to a release it serves whole.") from None


def built_once(binary: Path, force: bool, build: Callable[[], Path]) -> Path:
    """``binary``, made by ``build()`` unless it is there already (or ``force``); one build of it
    at a time across processes (a lock file beside its folder), so parallel test runs share it."""
    with _lock(binary.parent.with_name(binary.parent.name + ".lock")):
        if binary.is_file() and not force:
            return binary
        return build()


def build_go_program(module: str, version: str, package: str, binary: Path, *,
                     ldflags: str, what: str, check=None, tags: str = "") -> Path:
    """Build ``package`` of ``module@version`` into ``binary``, statically linked (with the
    Go build ``tags``, comma-separated, if any).

    Jaeger and Docker Compose cannot be built with `go install pkg@version`: their go.mod
    files carry replace (Jaeger) or exclude (Compose) directives, which `go install` refuses.
    A throw-away main module copies those directives and the program's own go.sum (its
    verified hashes; the checksum database does not answer for every module here), then
    `go get` + `go build`. CGO_ENABLED=0 makes the binary static, so it also runs alone in
    an image built FROM scratch (scripts/images.py). ``check(module_dir)`` may veto the
    downloaded module (e.g. that a Go module version is the expected release).
    """
    workdir = binary.parent
    go = find_go()
    workdir.mkdir(parents=True, exist_ok=True)
    env = _go_env(go, {"CGO_ENABLED": "0"})
    t0 = time.monotonic()
    _log(f"downloading {module}@{version} ({what})")
    with tempfile.TemporaryDirectory(prefix="go-dl-") as empty:
        info = json.loads(_run([go, "mod", "download", "-json", f"{module}@{version}"],
                               cwd=Path(empty), env=env, what=f"go mod download {module}"))
    moddir = Path(info["Dir"])
    if check is not None:
        check(moddir)
    upstream = json.loads(_run([go, "mod", "edit", "-json", str(moddir / "go.mod")],
                               cwd=workdir, env=env, what="go mod edit -json"))

    def spelled(m: dict) -> str:
        return m["Path"] + (" " + m["Version"] if m.get("Version") else "")

    lines = [f"module local/otel-stepspan-build-{binary.name}", "", f"go {upstream['Go']}", ""]
    lines += [f"replace {spelled(r['Old'])} => {spelled(r['New'])}" for r in upstream.get("Replace") or []]
    lines += [f"exclude {spelled(e)}" for e in upstream.get("Exclude") or []]
    src = workdir / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    (src / "go.mod").write_text("\n".join(lines) + "\n")
    shutil.copyfile(moddir / "go.sum", src / "go.sum")
    os.chmod(src / "go.sum", 0o644)
    _run([go, "get", f"{package}@{version}"], cwd=src, env=env, what=f"go get {package}")
    _log(f"compiling {what} (a few minutes on 2 cores)")
    tmp = binary.with_name(binary.name + ".tmp")
    _run([go, "build", "-trimpath", *(["-tags", tags] if tags else []), "-ldflags",
          f"-s -w {ldflags}", "-o", str(tmp), package], cwd=src, env=env, what=f"go build {package}")
    tmp.replace(binary)
    _log(f"{what} built in {time.monotonic() - t0:.0f}s: {binary} "
         f"({binary.stat().st_size / 2**20:.1f} MiB)")
    return binary


def _build_jaeger_program(v: Versions, package: str, binary: Path, what: str, force: bool) -> Path:
    """Build ``package`` of the Jaeger module at the pinned release into ``binary`` (if
    missing), after checking that the module version downloaded is that release."""
    modver = v.jaeger_module

    def is_the_release(moddir: Path) -> None:
        changelog = (moddir / "CHANGELOG.md").read_text(encoding="utf-8", errors="replace")
        if f"{modver} / v{v.jaeger}" not in changelog:
            raise BackendError(f"{JAEGER_MODULE}@{modver} is not Jaeger v{v.jaeger} "
                               f"(no '{modver} / v{v.jaeger}' in its CHANGELOG.md)")

    return built_once(binary, force, lambda: build_go_program(
        JAEGER_MODULE, modver, package, binary, what=f"{what} v{v.jaeger}",
        ldflags=f"-X {JAEGER_MODULE}/internal/version.latestVersion=v{v.jaeger}",
        check=is_the_release))


def build_jaeger(versions: Versions | None = None, *, force: bool = False) -> Path:
    """Build Jaeger v2 (cmd/jaeger) from its Go module (if missing)."""
    v = versions or pinned_versions()
    return _build_jaeger_program(v, JAEGER_PACKAGE, binary_paths(v)["jaeger"], "Jaeger", force)


def build_es_index_cleaner(versions: Versions | None = None, *, force: bool = False) -> Path:
    """Build Jaeger's index cleaner (cmd/es-index-cleaner of the same module and release as
    Jaeger) if missing: what deletes the fleet's old daily OpenSearch indices (IndexCleaner)."""
    v = versions or pinned_versions()
    return _build_jaeger_program(v, ES_INDEX_CLEANER_PACKAGE, binary_paths(v)["es_index_cleaner"],
                                 "Jaeger's es-index-cleaner", force)


def build_prometheus(versions: Versions | None = None, *, force: bool = False) -> Path:
    """Build Prometheus (cmd/prometheus) from its Go module (if missing): the metrics store
    behind Jaeger's Monitor tab. Without service-discovery plugins and without the web UI's
    assets (PROMETHEUS_BUILD_TAGS); its HTTP API, which Jaeger queries, is complete."""
    v = versions or pinned_versions()
    binary = binary_paths(v)["prometheus"]

    def is_the_release(moddir: Path) -> None:
        found = (moddir / "VERSION").read_text(encoding="utf-8").strip()
        if found != v.prometheus:
            raise BackendError(f"{PROMETHEUS_MODULE}@{v.prometheus_module} is Prometheus {found}, "
                               f"not {v.prometheus}")

    return built_once(binary, force, lambda: build_go_program(
        PROMETHEUS_MODULE, v.prometheus_module, PROMETHEUS_PACKAGE, binary,
        what=f"Prometheus v{v.prometheus}", tags=PROMETHEUS_BUILD_TAGS,
        ldflags=f"-X github.com/prometheus/common/version.Version={v.prometheus}",
        check=is_the_release))


def search_front_sources() -> list[Path]:
    """The search front's source files (its tests excluded): what its build is keyed by."""
    return [SEARCH_FRONT_DIR / "go.mod",
            *sorted(p for p in SEARCH_FRONT_DIR.glob("*.go") if not p.name.endswith("_test.go"))]


def search_front_digest() -> str:
    return _sha256(*search_front_sources())


def build_search_front(*, force: bool = False) -> Path:
    """Build the search front (jaeger/search_front) when its binary for this source is missing:
    standard library only, so no download; static (CGO_ENABLED=0) for an image FROM scratch."""
    binary = binary_paths()["search_front"]

    def build() -> Path:
        go = find_go()
        binary.parent.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_name(binary.name + ".tmp")
        t0 = time.monotonic()
        _run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(tmp), "."],
             cwd=SEARCH_FRONT_DIR, env=_go_env(go, {"CGO_ENABLED": "0", "GOTOOLCHAIN": "local"}),
             what="go build the search front")
        tmp.replace(binary)
        _log(f"search front built in {time.monotonic() - t0:.0f}s: {binary}")
        return binary

    return built_once(binary, force, build)


def kafka_libs_dir() -> Path:
    """Where Kafka's jars are (or will be): one folder, there only once complete."""
    return backends_dir() / f"kafka-{KAFKA_VERSION}" / "libs"


def find_java_tools(*, maven: bool = True) -> tuple[str, str | None]:
    """(java, mvn): the commands that fetch and run Kafka; mvn only when ``maven``."""
    java, mvn = shutil.which("java"), shutil.which("mvn")
    if not java or (maven and not mvn):
        raise BackendError(
            "Kafka runs from Maven Central's jars: it needs java (17 or newer) and, to fetch the "
            "jars the first time, mvn (Maven 3) on PATH (Debian: apt-get install openjdk-17-jre-headless maven)")
    return java, mvn if maven else None


def kafka_pom() -> str:
    """A throw-away Maven project whose runtime dependencies are Kafka's broker, its storage
    and tools (StorageTool formats the KRaft log), and the log4j SLF4J binding Kafka's server
    needs but does not depend on; connect-runtime (Kafka Connect, ~40 jars) is left out."""
    deps = []
    for coordinate in KAFKA_ARTIFACTS:
        group, artifact = coordinate.split(":")
        exclusion = ("<exclusions><exclusion><groupId>org.apache.kafka</groupId>"
                     "<artifactId>connect-runtime</artifactId></exclusion></exclusions>")
        deps.append(f"<dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
                    f"<version>{KAFKA_VERSION}</version>{exclusion}</dependency>")
    deps.append("<dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl"
                f"</artifactId><version>{KAFKA_LOG4J_VERSION}</version></dependency>")
    body = "\n    ".join(deps)
    return ('<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
            "  <modelVersion>4.0.0</modelVersion>\n"
            "  <groupId>local.otel-stepspan</groupId><artifactId>kafka-jars</artifactId>"
            "<version>1</version><packaging>pom</packaging>\n"
            f"  <dependencies>\n    {body}\n  </dependencies>\n</project>\n")


def fetch_kafka(*, force: bool = False) -> Path:
    """Kafka's jars (KAFKA_VERSION) in kafka_libs_dir(), fetched from Maven Central with
    `mvn dependency:copy-dependencies` when missing (about 45 MB; seconds once Maven's own
    cache holds them). Written beside, then renamed into place: a folder there is complete."""
    libs = kafka_libs_dir()
    with _lock(libs.parent.with_name(libs.parent.name + ".lock")):
        if libs.is_dir() and not force:
            return libs
        _, mvn = find_java_tools()
        libs.parent.mkdir(parents=True, exist_ok=True)
        pom = libs.parent / "pom.xml"
        pom.write_text(kafka_pom(), encoding="utf-8")
        tmp = libs.with_name("libs.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        _log(f"fetching Kafka {KAFKA_VERSION}'s jars from Maven Central into {libs}")
        _run([str(mvn), "-B", "-q", "-f", str(pom), f"{MAVEN_DEPENDENCY_PLUGIN}:copy-dependencies",
              "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"],
             cwd=libs.parent, env=os.environ, what=f"mvn: fetch Kafka {KAFKA_VERSION}")
        for jar in (f"kafka_2.13-{KAFKA_VERSION}.jar", f"log4j-core-{KAFKA_LOG4J_VERSION}.jar"):
            if not (tmp / jar).is_file():
                raise BackendError(f"Kafka {KAFKA_VERSION}'s jars hold no {jar}: KAFKA_LOG4J_VERSION in "
                                   f"{__file__} must be the log4j-core version Kafka depends on "
                                   f"(see {sorted(f.name for f in tmp.glob('log4j-core-*'))})")
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        _log(f"Kafka {KAFKA_VERSION} fetched in {time.monotonic() - t0:.0f}s: {libs} "
             f"({sum(f.stat().st_size for f in libs.iterdir()) / 2**20:.0f} MiB)")
    return libs


def opensearch_home() -> Path:
    """OpenSearch's home (lib/, modules/transport-netty4/, bin/, extensions/): there only once
    complete."""
    return backends_dir() / f"opensearch-{OPENSEARCH_VERSION}"


def _maven_pom(name: str, dependencies: "list[tuple[str, str, str]]") -> str:
    """A throw-away Maven project whose runtime dependencies are ``dependencies`` (group,
    artifact, version): what `mvn dependency:copy-dependencies` copies."""
    deps = "\n    ".join(f"<dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
                          f"<version>{v}</version></dependency>" for g, a, v in dependencies)
    return ('<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
            "  <modelVersion>4.0.0</modelVersion>\n"
            f"  <groupId>local.otel-stepspan</groupId><artifactId>{name}</artifactId>"
            "<version>1</version><packaging>pom</packaging>\n"
            f"  <dependencies>\n    {deps}\n  </dependencies>\n</project>\n")


def _copy_dependencies(pom_text: str, pom: Path, out: Path, what: str) -> None:
    pom.write_text(pom_text, encoding="utf-8")
    _run(["nice", "-n", "10", str(find_java_tools()[1]), "-B", "-q", "-f", str(pom),
          f"{MAVEN_DEPENDENCY_PLUGIN}:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={out}"],
         cwd=pom.parent, env=os.environ, what=f"mvn: fetch {what}")


def fetch_opensearch(*, force: bool = False) -> Path:
    """OpenSearch's home (OPENSEARCH_VERSION) at opensearch_home(), put together from Maven
    Central's jars with `mvn dependency:copy-dependencies` when missing (about 45 MB; seconds once
    Maven's own cache holds them): the server and its dependencies in lib/, with log4j-core and
    the plugin class loader its published list leaves out; the one module Jaeger needs, HTTP and
    node-to-node transport, in modules/transport-netty4/ with a descriptor and a security policy
    (opensearch/transport-netty4.policy) that the module's jar does not carry; the empty bin/,
    extensions/ and plugins/ the node expects. Written beside, then renamed into place."""
    home = opensearch_home()
    with _lock(home.with_name(home.name + ".lock")):
        if home.is_dir() and not force:
            return home
        tmp = home.with_name(home.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module = tmp / "modules" / "transport-netty4"
        for folder in (tmp / "lib", module, tmp / "bin", tmp / "extensions", tmp / "plugins"):
            folder.mkdir(parents=True)
        t0 = time.monotonic()
        _log(f"fetching OpenSearch {OPENSEARCH_VERSION}'s jars from Maven Central into {home}")
        _copy_dependencies(_maven_pom("opensearch-jars", [
            ("org.opensearch", "opensearch", OPENSEARCH_VERSION),
            ("org.opensearch", "opensearch-plugin-classloader", OPENSEARCH_VERSION),
            ("org.apache.logging.log4j", "log4j-core", OPENSEARCH_LOG4J_VERSION)]),
            tmp / "pom.xml", tmp / "lib", f"OpenSearch {OPENSEARCH_VERSION}")
        _copy_dependencies(_maven_pom("opensearch-transport-netty4", [
            ("org.opensearch.plugin", "transport-netty4-client", OPENSEARCH_VERSION)]),
            tmp / "pom-netty4.xml", module, "OpenSearch's transport-netty4 module")
        for jar in (tmp / "lib" / f"opensearch-{OPENSEARCH_VERSION}.jar",
                    tmp / "lib" / f"log4j-api-{OPENSEARCH_LOG4J_VERSION}.jar",
                    module / f"transport-netty4-client-{OPENSEARCH_VERSION}.jar"):
            if not jar.is_file():
                raise BackendError(f"OpenSearch {OPENSEARCH_VERSION}'s jars hold no {jar.name}: "
                                   f"OPENSEARCH_LOG4J_VERSION in {__file__} must be the log4j-api version "
                                   f"OpenSearch depends on (see {sorted(f.name for f in (tmp / 'lib').glob('log4j-*'))})")
        (module / "plugin-descriptor.properties").write_text(
            "description=Netty 4 based transport and HTTP (fetched by scripts/backends.py)\n"
            f"version={OPENSEARCH_VERSION}\nname=transport-netty4\n"
            "classname=org.opensearch.transport.Netty4Plugin\njava.version=11\n"
            f"opensearch.version={OPENSEARCH_VERSION}\n", encoding="utf-8")
        shutil.copyfile(OPENSEARCH_NETTY_POLICY, module / "plugin-security.policy")
        shutil.rmtree(home, ignore_errors=True)
        tmp.rename(home)
        size = sum(f.stat().st_size for f in home.rglob("*.jar")) / 2**20
        _log(f"OpenSearch {OPENSEARCH_VERSION} fetched in {time.monotonic() - t0:.0f}s: {home} ({size:.0f} MiB)")
    return home


def ensure_built(components: tuple[str, ...] = ("otelcol", "jaeger", "prometheus",
                                                  "search_front"),
                 *, force: bool = False) -> dict[str, Path]:
    """Build the missing binaries; return {"otelcol": Path, "jaeger": Path, "prometheus": Path,
    "search_front": Path}, and "otelcol_gateway" (the fleet Collector), "es_index_cleaner"
    (Jaeger's, for the fleet's OpenSearch indices) and "kafka" (the folder of Kafka's jars,
    fetched with Maven) when they are asked for."""
    v = pinned_versions()
    out: dict[str, Path] = {}
    if "otelcol" in components:
        out["otelcol"] = build_collector(v, force=force)
    if "jaeger" in components:
        out["jaeger"] = build_jaeger(v, force=force)
    if "prometheus" in components:
        out["prometheus"] = build_prometheus(v, force=force)
    if "es_index_cleaner" in components:
        out["es_index_cleaner"] = build_es_index_cleaner(v, force=force)
    if "search_front" in components:
        out["search_front"] = build_search_front(force=force)
    if "otelcol_gateway" in components:
        out["otelcol_gateway"] = build_gateway(force=force)
    if "kafka" in components:
        out["kafka"] = fetch_kafka(force=force)
    if "opensearch" in components:
        out["opensearch"] = fetch_opensearch(force=force)
    return out


# --------------------------------------------------------------------------- configs

_KEY_RE = re.compile(r"^(\s*)([A-Za-z0-9_./-]+):(\s*)(.*?)\s*$")


def _path_matches(pattern: tuple[str, ...], parents: tuple[str, ...]) -> bool:
    """("exporters", "otlp*") matches ("exporters", "otlp_grpc/jaeger"): component IDs
    compare by type (before "/"); a trailing * matches a type prefix."""
    if len(pattern) != len(parents):
        return False
    for p, q in zip(pattern, parents):
        q = q.split("/")[0]
        if not (q.startswith(p[:-1]) if p.endswith("*") else q == p):
            return False
    return True


def _rewrite(src: Path, endpoints: Mapping[tuple[str, ...], str],
             paths: Mapping[str, str]) -> tuple[list[str], int | None]:
    """The lines of ``src`` with the `endpoint:` under each pattern of ``endpoints`` set to its
    value, and each container path of ``paths`` (a prefix) replaced; and the index of the
    top-level `service:` line. Raises ValueError unless each endpoint is found exactly once
    and each path at least once."""
    done: dict[tuple[str, ...], int] = dict.fromkeys(endpoints, 0)
    stack: list[tuple[int, str]] = []
    out: list[str] = []
    service_line = None
    text = Path(src).read_text(encoding="utf-8")
    for old in paths:
        if old not in text:
            raise ValueError(f"{src}: path {old} not found")
    for line in text.splitlines(keepends=True):
        m = _KEY_RE.match(line.rstrip("\n"))
        if not m or line.lstrip().startswith("#"):
            out.append(line)
            continue
        indent, key, sep, value = len(m.group(1)), m.group(2), m.group(3), m.group(4)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = tuple(k for _, k in stack)
        stack.append((indent, key))
        if parents == () and key == "service":
            service_line = len(out)
        if key == "endpoint":
            for pat, new in endpoints.items():
                if _path_matches(pat, parents):
                    comment = "  " + value[value.index("#"):] if "#" in value else ""
                    line = f"{m.group(1)}endpoint:{sep or ' '}{new}{comment}\n"
                    done[pat] += 1
                    break
        for old, new in paths.items():
            line = line.replace(old, new)
        out.append(line)
    bad = {"/".join(k): n for k, n in done.items() if n != 1}
    if bad:
        raise ValueError(f"{src}: endpoints not found exactly once: {bad}")
    return out, service_line


# Container paths in the project's configs, replaced by local directories for runs without Docker.
COLLECTOR_QUEUE_PATH = "/var/lib/otelcol/file_storage"
COLLECTOR_SECRETS_PATH = "/etc/otelcol-contrib/secrets"
JAEGER_DATA_PATH = "/tmp/jaeger"


def write_local_collector_config(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    otlp_grpc_port: int,
    otlp_http_port: int,
    jaeger_otlp_grpc_endpoint: str,
    metrics_port: int,
    health_port: int,
    *,
    queue_dir: str | os.PathLike[str],
    host: str = LOCALHOST,
    internal_metrics_port: int | None = None,
) -> Path:
    """Copy the project's collector config with only its endpoints and queue directory
    rewritten for a local run.

    Everything else (processors, queue and retry settings, span_metrics, pipelines, comments)
    stays identical. One addition: the collector's own telemetry would listen on
    localhost:8888 by default, which collides between parallel runs; it is switched off
    (`service.telemetry.metrics.level: none`) unless internal_metrics_port is given, then it
    listens on host:internal_metrics_port. Raises ValueError if an expected endpoint is not
    found exactly once.
    """
    wanted = {
        ("receivers", "otlp", "protocols", "grpc"): f"{host}:{otlp_grpc_port}",
        ("receivers", "otlp", "protocols", "http"): f"{host}:{otlp_http_port}",
        ("exporters", "otlp*"): jaeger_otlp_grpc_endpoint,
        ("exporters", "prometheus"): f"{host}:{metrics_port}",
        ("extensions", "health_check"): f"{host}:{health_port}",
    }
    out, service_line = _rewrite(Path(src), wanted, {COLLECTOR_QUEUE_PATH: str(queue_dir)})
    _add_telemetry(src, out, service_line, host, internal_metrics_port)
    Path(queue_dir).mkdir(parents=True, exist_ok=True)
    return _write(dst, out)


def _add_telemetry(src: str | os.PathLike[str], out: list[str], service_line: int | None,
                   host: str, internal_metrics_port: int | None) -> None:
    """Insert service.telemetry into ``out``: the collector's own metrics off, or on
    host:internal_metrics_port (their default, localhost:8888, collides between collectors)."""
    if service_line is None:
        raise ValueError(f"{src}: no top-level service: section")
    if any(line.startswith("  telemetry:") for line in out[service_line:]):
        raise ValueError(f"{src}: has service.telemetry; this function writes it")
    if internal_metrics_port is None:
        telemetry = ["  telemetry:\n", "    metrics:\n", "      level: none\n"]
    else:
        telemetry = [
            "  telemetry:\n", "    metrics:\n", "      readers:\n", "        - pull:\n",
            "            exporter:\n", "              prometheus:\n",
            f"                host: {host}\n", f"                port: {internal_metrics_port}\n",
        ]
    out[service_line + 1:service_line + 1] = telemetry


def _replace_block(src: str | os.PathLike[str], lines: list[str], key: str, block: list[str]) -> list[str]:
    """``lines`` with the one line ``<indent>key:`` (not a comment) and the lines indented
    deeper under it replaced by ``block`` (YAML lines, their indent relative to that line's);
    raises ValueError unless that key is there exactly once, with something under it."""
    at = [i for i, line in enumerate(lines) if line.strip() == f"{key}:" and not line.lstrip().startswith("#")]
    if len(at) != 1:
        raise ValueError(f"{src}: `{key}:` not found exactly once")
    indent = lines[at[0]][:len(lines[at[0]]) - len(lines[at[0]].lstrip())]
    end = at[0] + 1
    while end < len(lines) and lines[end].strip() and lines[end].startswith(indent + " "):
        end += 1
    if end == at[0] + 1:
        raise ValueError(f"{src}: `{key}:` holds nothing")
    return lines[:at[0]] + [f"{indent}{line}\n" for line in block] + lines[end:]


def write_local_agent_config(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    otlp_grpc_port: int,
    otlp_http_port: int,
    gateways: "list[str]",
    health_port: int,
    *,
    queue_dir: str | os.PathLike[str],
    host: str = LOCALHOST,
    internal_metrics_port: int | None = None,
) -> Path:
    """collector/agent.yaml for a local run: its receivers and health check on ``host``, the
    load_balancing exporter's `dns` resolver replaced by a `static` list of ``gateways``
    (host:port of their OTLP gRPC receivers: local processes on one address have no DNS name
    each), its queue in ``queue_dir``, the collector's own metrics as
    write_local_collector_config sets them; nothing else changed."""
    wanted = {
        ("receivers", "otlp", "protocols", "grpc"): f"{host}:{otlp_grpc_port}",
        ("receivers", "otlp", "protocols", "http"): f"{host}:{otlp_http_port}",
        ("extensions", "health_check"): f"{host}:{health_port}",
    }
    if not gateways:
        raise ValueError("an agent needs at least one gateway")
    out, service_line = _rewrite(Path(src), wanted, {COLLECTOR_QUEUE_PATH: str(queue_dir)})
    out = _replace_block(src, out, "dns", ["static:", "  hostnames:", *(f"    - {g}" for g in gateways)])
    service_line = out.index("service:\n") if "service:\n" in out else None
    _add_telemetry(src, out, service_line, host, internal_metrics_port)
    Path(queue_dir).mkdir(parents=True, exist_ok=True)
    return _write(dst, out)


def write_local_secured_config(dst: str | os.PathLike[str],
                               secrets_dir: str | os.PathLike[str]) -> Path:
    """collector/secured.yaml with its secrets read from ``secrets_dir`` (see make_secrets)."""
    out, _ = _rewrite(SECURED_CONFIG, {}, {COLLECTOR_SECRETS_PATH: str(Path(secrets_dir).resolve())})
    return _write(dst, out)


def _write(dst: str | os.PathLike[str], lines: list[str]) -> Path:
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(lines), encoding="utf-8")
    return dst


@dataclass(frozen=True)
class JaegerPorts:
    otlp_grpc: int
    otlp_http: int
    query_http: int  # UI and /api/v3/* (HTTP), /api/* (the UI's internal API)
    query_grpc: int  # api_v3 gRPC QueryService
    health: int


def write_jaeger_config(dst: str | os.PathLike[str], ports: JaegerPorts, *,
                        data_dir: str | os.PathLike[str], host: str = LOCALHOST,
                        prometheus_url: str | None = None,
                        ui_assets: str | os.PathLike[str] | None = None,
                        src: Path = JAEGER_CONFIG) -> Path:
    """The project's jaeger/config.yaml (Badger storage; or ``src``: jaeger/opensearch.yaml,
    whose store is given by STEPSPAN_OPENSEARCH_URLS) with its endpoints on ``host``, its
    Badger directories under ``data_dir`` and its metric backend (the Monitor tab's) at
    ``prometheus_url`` (default http://host:9090, where `run` puts Prometheus); nothing else
    changed, but for ``ui_assets``: a built jaeger-ui (the directory holding its index.html) for
    Jaeger to serve, since a Jaeger built from its Go module serves a placeholder page."""
    wanted = {
        ("extensions", "jaeger_storage", "metric_backends", "*", "prometheus"):
            prometheus_url or f"http://{host}:9090",
        ("extensions", "healthcheckv2", "http"): f"{host}:{ports.health}",
        ("extensions", "jaeger_query", "http"): f"{host}:{ports.query_http}",
        ("extensions", "jaeger_query", "grpc"): f"{host}:{ports.query_grpc}",
        ("receivers", "otlp", "protocols", "grpc"): f"{host}:{ports.otlp_grpc}",
        ("receivers", "otlp", "protocols", "http"): f"{host}:{ports.otlp_http}",
    }
    badger = {JAEGER_DATA_PATH: str(Path(data_dir).resolve())} if src == JAEGER_CONFIG else {}
    out, _ = _rewrite(src, wanted, badger)
    if ui_assets is not None:
        assets = Path(ui_assets).resolve()
        if not (assets / "index.html").is_file():
            raise BackendError(f"{assets}: no index.html (give the directory a jaeger-ui build wrote)")
        at = out.index("  jaeger_query:\n") + 1
        out[at:at] = ["    ui:\n", f"      assets_path: {json.dumps(str(assets))}\n"]
    return _write(dst, out)


_TARGETS_RE = re.compile(r'^(\s*- targets: )\[.*\]$', re.MULTILINE)


def write_prometheus_config(dst: str | os.PathLike[str], collector_metrics: "str | list[str]", *,
                            src: str | os.PathLike[str] = PROMETHEUS_CONFIG) -> Path:
    """The project's prometheus/prometheus.yml (or ``src``: prometheus/prometheus-fleet.yml)
    scraping ``collector_metrics`` (host:port of the collector's prometheus exporter, or a list:
    every gateway's) instead of the compose services; nothing else changed (the relabelling
    Jaeger's Monitor tab needs stays as it is). Raises ValueError unless ``src`` has exactly
    one `- targets: [...]` line, and when the list is empty."""
    targets = [collector_metrics] if isinstance(collector_metrics, str) else list(collector_metrics)
    if not targets:
        raise ValueError("Prometheus needs at least one target")
    text = Path(src).read_text(encoding="utf-8")
    if len(_TARGETS_RE.findall(text)) != 1:
        raise ValueError(f"{src}: `- targets: [...]` not found exactly once")
    new = _TARGETS_RE.sub(lambda m: m.group(1) + json.dumps(targets), text)
    return _write(dst, [new])


@dataclass(frozen=True)
class KafkaPorts:
    broker: int  # what the gateways and Jaeger connect to (STEPSPAN_KAFKA_BROKERS)
    controller: int  # the KRaft controller's (the node's own quorum)


def write_kafka_config(dst: str | os.PathLike[str], ports: KafkaPorts, *,
                       data_dir: str | os.PathLike[str], host: str = LOCALHOST) -> Path:
    """The project's kafka/server.properties with its listeners and the controller quorum on
    ``host`` and its log in ``data_dir``; nothing else changed (retention stays as documented
    there). Raises ValueError unless each of those keys is set exactly once."""
    wanted = {
        "controller.quorum.bootstrap.servers": f"{host}:{ports.controller}",
        "listeners": f"PLAINTEXT://{host}:{ports.broker},CONTROLLER://{host}:{ports.controller}",
        "advertised.listeners": f"PLAINTEXT://{host}:{ports.broker}",
        "log.dirs": str(Path(data_dir).resolve()),
    }
    lines = KAFKA_CONFIG.read_text(encoding="utf-8").splitlines(keepends=True)
    for key, value in wanted.items():
        at = [i for i, line in enumerate(lines) if line.split("=", 1)[0].strip() == key]
        if len(at) != 1:
            raise ValueError(f"{KAFKA_CONFIG}: `{key}=` not found exactly once")
        lines[at[0]] = f"{key}={value}\n"
    return _write(dst, lines)


def make_secrets(secrets_dir: str | os.PathLike[str] = SECRETS_DIR, *,
                 days: int = 825) -> dict[str, Path]:
    """A private CA, a server certificate it signs (for localhost, 127.0.0.1 and the compose
    service name otel-collector) and a random bearer token, made with the openssl command.
    Existing files are kept: delete the directory to make new ones."""
    secrets_dir = Path(secrets_dir)
    files = {name: secrets_dir / name for name in ("ca.crt", "server.crt", "server.key", "token")}
    if all(f.is_file() for f in files.values()):
        return files
    openssl = shutil.which("openssl")
    if not openssl:
        raise BackendError("the openssl command is needed to make the TLS certificates")
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="otel-stepspan-ca-") as tmp:
        ca_key, csr, ext = Path(tmp) / "ca.key", Path(tmp) / "server.csr", Path(tmp) / "server.ext"
        ext.write_text("subjectAltName=DNS:localhost,DNS:otel-collector,IP:127.0.0.1\n"
                       "extendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
        steps = [
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(files["ca.crt"]), "-days", str(days), "-subj", "/CN=otel_stepspan local CA"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(files["server.key"]),
             "-out", str(csr), "-subj", "/CN=otel-collector"],
            ["x509", "-req", "-in", str(csr), "-CA", str(files["ca.crt"]), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(files["server.crt"]), "-days", str(days),
             "-extfile", str(ext)],
        ]
        for argv in steps:
            _run([openssl, *argv], cwd=Path(tmp), env=env, what="openssl " + argv[0])
    files["token"].write_text(secrets.token_urlsafe(32) + "\n")
    for f in files.values():
        os.chmod(f, 0o600 if f.name in ("server.key", "token") else 0o644)
    return files


# --------------------------------------------------------------------------- processes


def free_port(host: str = LOCALHOST) -> int:
    return free_ports(1, host)[0]


_handed_out: set[int] = set()
_handed_out_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux's ``ip_local_port_range``;
    the IANA range where that cannot be read)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


# Below the ephemeral range, above the well-known and most registered servers' ports.
_PICKED_FROM = 20000


def reserve_ports(ports: "Mapping[str, int | None] | None") -> None:
    """Keep ``free_ports`` off ports given by number (``run --otlp-grpc-port``, a test's fixed
    ports): a stack picks its other ports before it binds those, and in a process of its own
    it would not know them otherwise."""
    with _handed_out_lock:
        _handed_out.update(port for port in (ports or {}).values() if port)


def free_ports(n: int, host: str = LOCALHOST) -> list[int]:
    """``n`` distinct free ports, none handed out before by this process: each stack started
    side by side (the fault tests run several at once) gets ports of its own.

    They come from below the kernel's ephemeral range. A port the kernel picked for ``bind(0)``
    is one it may hand to any outgoing connection a moment later; a scenario that keeps its
    collector down for 20 s while the engine and other stacks connect around it found its port
    taken that way. Ports outside the range only go to those who ask for them by number."""
    low, high = ephemeral_range()
    start, stop = (_PICKED_FROM, low) if low - _PICKED_FROM >= 1000 else (1024, low)
    if stop - start < 1000:  # a range that leaves no room below it: let the kernel pick
        start = stop = 0
    with _handed_out_lock, contextlib.ExitStack() as held:
        picked: list[int] = []
        tries = 0
        while len(picked) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise BackendError(f"no {n} free ports on {host} below {low}")
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            candidate = random.randrange(start, stop) if stop else 0
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            port = s.getsockname()[1]
            if port not in _handed_out:
                picked.append(port)
        _handed_out.update(picked)
        return picked


def wait_http_ok(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BackendError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
                last = r.status
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.2)
    raise BackendError(f"{url} not ready after {timeout}s (last: {last})")


def _check_free(ports: "list[int] | tuple[int, ...]", host: str = LOCALHOST) -> None:
    """Fail early if a port is taken: a stale server would answer our health probe."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # SO_REUSEADDR like Go's listeners: a TIME_WAIT leftover is not "in use".
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise BackendError(f"{host}:{port} is already in use ({e})") from None


def _tied_to_this_thread(argv: list[str]) -> list[str]:
    """``argv`` run so that it gets SIGTERM when the thread starting it ends, the process with
    it (util-linux's ``setpriv --pdeathsig``, where there is one): a stack whose owner was
    killed (SIGKILL, or a SIGTERM no handler caught: a CI timeout, ``kill`` of a test run or a
    benchmark) does not leave its JVMs and collectors running for nobody. A stack stopped the
    usual way has stopped them before; ``run`` catches SIGTERM and stops them itself."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def _start(argv: list[str], log_path: Path, health_url: str | None, timeout: float,
           env: Mapping[str, str] | None = None,
           ready: "Callable[[subprocess.Popen, int], None] | None" = None) -> subprocess.Popen:
    """Start ``argv`` with its output appended to ``log_path``; return once ``health_url``
    answers 200, or, for a process with no HTTP health (Kafka), once ``ready(proc, offset)``
    returns (``offset``: the log's size before the start)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    offset = log.tell()
    _log(f"starting: {' '.join(argv)}  (log: {log_path})")
    proc = subprocess.Popen(_tied_to_this_thread(argv), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=log_path.parent, env={**os.environ, **(env or {})})
    proc.log_path = log_path  # type: ignore[attr-defined]  # named when it ends (Supervisor)
    log.close()
    try:
        if ready is not None:
            ready(proc, offset)
        else:
            wait_http_ok(health_url, timeout, proc)
        time.sleep(0.3)
        if proc.poll() is not None:
            raise BackendError(f"process exited with {proc.returncode} right after start")
    except BackendError as e:
        stop(proc)
        tail = log_path.read_text(errors="replace").splitlines()[-20:]
        raise BackendError(f"{e}\n--- {log_path} ---\n" + "\n".join(tail)) from None
    return proc


def start_jaeger(workdir: str | os.PathLike[str], ports: JaegerPorts, *,
                 data_dir: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None,
                 binary: Path | None = None, timeout: float = 60.0,
                 prometheus_url: str | None = None,
                 ui_assets: str | os.PathLike[str] | None = None,
                 overlays: "tuple[Path, ...]" = (),
                 src: Path = JAEGER_CONFIG) -> subprocess.Popen:
    """Start Jaeger v2 with the project's config (Badger in ``data_dir``, by default
    workdir/jaeger_data) on 127.0.0.1, and ``overlays`` merged on top of it (jaeger/ingester.yaml:
    read Kafka instead of OTLP); returns once it is healthy. Starting it again with the
    same directories finds every span it stored before. ``env`` adds variables
    (JAEGER_RETENTION, STEPSPAN_KAFKA_BROKERS); the Monitor tab queries ``prometheus_url`` (see
    write_jaeger_config); ``src`` jaeger/opensearch.yaml stores in OpenSearch instead."""
    workdir = Path(workdir)
    _check_free([ports.otlp_grpc, ports.otlp_http, ports.query_http, ports.query_grpc, ports.health])
    config = write_jaeger_config(workdir / "jaeger.yaml", ports, prometheus_url=prometheus_url,
                                 data_dir=data_dir or workdir / "jaeger_data", ui_assets=ui_assets, src=src)
    binary = binary or ensure_built(("jaeger",))["jaeger"]
    return _start([str(binary), f"--config={config}", *(f"--config={o}" for o in overlays)], workdir / "jaeger.log",
                  f"http://{LOCALHOST}:{ports.health}/status", timeout, env)


def start_collector(config: str | os.PathLike[str], health_port: int, *,
                    other_ports: "tuple[int, ...] | list[int]" = (),
                    extra_configs: "tuple[Path, ...]" = (),
                    env: Mapping[str, str] | None = None,
                    binary: Path | None = None, timeout: float = 60.0) -> subprocess.Popen:
    """Start the collector with a (local) config, and overlays merged on top; returns once
    health_check answers. other_ports (OTLP, metrics) are checked to be free first."""
    config = Path(config)
    _check_free([health_port, *other_ports])
    binary = binary or ensure_built(("otelcol",))["otelcol"]
    argv = [str(binary), f"--config={config}", *(f"--config={c}" for c in extra_configs)]
    return _start(argv, config.with_suffix(".log"), f"http://{LOCALHOST}:{health_port}/", timeout, env)


def start_prometheus(workdir: str | os.PathLike[str], port: int, collector_metrics: "str | list[str]", *,
                     binary: Path | None = None, timeout: float = 60.0,
                     src: str | os.PathLike[str] = PROMETHEUS_CONFIG) -> subprocess.Popen:
    """Start Prometheus with the project's config (``src``), scraping ``collector_metrics``
    (host:port, or a list of them), its API on 127.0.0.1:``port`` and its data in
    workdir/prometheus_data (kept 2 days, as in docker-compose.yml); returns once /-/ready
    answers."""
    workdir = Path(workdir)
    _check_free([port])
    config = write_prometheus_config(workdir / "prometheus.yml", collector_metrics, src=src)
    binary = binary or ensure_built(("prometheus",))["prometheus"]
    argv = [str(binary), f"--config.file={config}", f"--web.listen-address={LOCALHOST}:{port}",
            f"--storage.tsdb.path={workdir / 'prometheus_data'}", "--storage.tsdb.retention.time=2d"]
    return _start(argv, workdir / "prometheus.log", f"http://{LOCALHOST}:{port}/-/ready", timeout)


def start_search_front(port: int, jaeger_url: str, log_path: Path, *, factor: int | None = None,
                       binary: Path | None = None, timeout: float = 30.0) -> subprocess.Popen:
    """Start the search front on 127.0.0.1:``port`` in front of Jaeger's query port at
    ``jaeger_url``; returns once /api/services answers through it (so Jaeger must be up)."""
    _check_free([port])
    binary = binary or build_search_front()
    argv = [str(binary), f"-listen={LOCALHOST}:{port}", f"-jaeger={jaeger_url}",
            *([f"-factor={factor}"] if factor else [])]
    return _start(argv, log_path, f"http://{LOCALHOST}:{port}/api/services", timeout)


def _port_open(port: int, host: str = LOCALHOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def start_kafka(workdir: str | os.PathLike[str], ports: KafkaPorts, *,
                data_dir: str | os.PathLike[str] | None = None,
                libs: Path | None = None, timeout: float = 90.0) -> subprocess.Popen:
    """Start Kafka (kafka/server.properties: one KRaft node, broker and controller) on
    127.0.0.1 with its log in ``data_dir`` (by default workdir/kafka_data); returns once the
    broker said it started and takes connections. The first start formats the data dir (a new
    cluster id); later ones keep it, and with it every topic, record and committed offset."""
    workdir = Path(workdir)
    data = Path(data_dir or workdir / "kafka_data")
    _check_free([ports.broker, ports.controller])
    config = write_kafka_config(workdir / "kafka.properties", ports, data_dir=data)
    libs = libs or fetch_kafka()
    java, _ = find_java_tools(maven=False)
    classpath = ["-cp", str(libs / "*")]
    if not (data / "meta.properties").is_file():
        _log(f"formatting Kafka's log in {data} (first start: a new cluster)")
        cluster_id = _run([java, *classpath, "kafka.tools.StorageTool", "random-uuid"], cwd=workdir,
                          env=os.environ, what="Kafka StorageTool random-uuid").strip().splitlines()[-1]
        if not re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id):
            raise BackendError(f"Kafka StorageTool random-uuid printed {cluster_id!r}, not a cluster id")
        _run([java, *classpath, "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
              "-c", str(config)], cwd=workdir, env=os.environ, what=f"Kafka StorageTool format {data}")
    log_path = workdir / "kafka.log"

    def ready(proc: subprocess.Popen, offset: int) -> None:
        """The broker's own line that it started, in this start's part of the log, then its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BackendError(f"Kafka exited with {proc.returncode} before it started")
            with open(log_path, "rb") as fh:
                fh.seek(offset)
                if b"Kafka Server started" in fh.read() and _port_open(ports.broker):
                    return
            time.sleep(0.2)
        raise BackendError(f"Kafka not started after {timeout}s")

    argv = [java, *KAFKA_JVM_OPTIONS, f"-Dlog4j2.configurationFile={KAFKA_LOG4J_CONFIG}", *classpath,
            "kafka.Kafka", str(config)]
    t0 = time.monotonic()
    proc = _start(argv, log_path, None, timeout, ready=ready)
    _log(f"Kafka {KAFKA_VERSION} ready on {LOCALHOST}:{ports.broker} in {time.monotonic() - t0:.1f}s")
    return proc


@dataclass(frozen=True)
class OpenSearchNode:
    name: str  # node.name, and the folder of its config, data and log under the workdir
    http: int  # what Jaeger talks to (STEPSPAN_OPENSEARCH_URLS)
    transport: int  # node to node
    holds_data: bool = True  # else a cluster-manager-eligible node only, a tie-breaker

    @property
    def url(self) -> str:
        """Its HTTP URL on 127.0.0.1."""
        return f"http://{LOCALHOST}:{self.http}"

    @property
    def roles(self) -> list[str]:
        """node.roles: every node may manage the cluster, so that any one of three can be lost
        and the other two still elect a manager (docs/scale.md)."""
        return ["cluster_manager", "data", "ingest"] if self.holds_data else ["cluster_manager"]


def write_opensearch_config(conf_dir: str | os.PathLike[str], node: OpenSearchNode,
                            cluster: "list[OpenSearchNode]", *, data_dir: str | os.PathLike[str],
                            logs_dir: str | os.PathLike[str]) -> Path:
    """The project's opensearch/opensearch.yml and log4j2.properties in ``conf_dir``, the first
    with this node's settings appended: its name and roles, ports, the other nodes' transport
    ports to find them by, and where its data and logs go. A new cluster is bootstrapped by the
    first node alone (cluster.initial_cluster_manager_nodes): it is the first elected manager,
    and the voting configuration grows to every node as the others join."""
    settings = {
        "node.name": node.name, "node.roles": node.roles, "http.port": node.http, "transport.port": node.transport,
        "discovery.seed_hosts": [f"{LOCALHOST}:{n.transport}" for n in cluster],
        "cluster.initial_cluster_manager_nodes": [cluster[0].name],
        "path.data": str(Path(data_dir).resolve()), "path.logs": str(Path(logs_dir).resolve()),
    }
    conf = Path(conf_dir)
    text = OPENSEARCH_CONFIG.read_text(encoding="utf-8") + "\n# Set by scripts/backends.py for this node:\n"
    text += "".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items())
    _write(conf / "opensearch.yml", [text])
    shutil.copyfile(OPENSEARCH_LOG4J_CONFIG, conf / "log4j2.properties")
    return conf / "opensearch.yml"


def _as_unprivileged() -> list[str]:
    """The command prefix that runs a node as an unprivileged user when this process is root:
    OpenSearch refuses to run as root. `unshare --user --map-user=1000` starts it in a user
    namespace of its own where it is uid 1000, with no capability at all, while its files stay
    this user's (it can read the cache under root's 0700 home and write its folders as root's
    files would be written, nothing more). [] when not root."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if not unshare:
        raise BackendError("OpenSearch refuses to run as root, and unshare (util-linux), which would start "
                           "it as an unprivileged user, is not on PATH")
    prefix = [unshare, "--user", "--map-user=1000", "--map-group=1000"]
    # Some containers forbid user namespaces (a seccomp profile, user.max_user_namespaces=0):
    # said here, before a node's log would bury it.
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        raise BackendError("OpenSearch refuses to run as root, and this machine refuses the user namespace "
                           f"that would start it as an unprivileged user ({' '.join(prefix)} true: "
                           f"{probe.stderr.strip() or f'exit {probe.returncode}'}). Run as a user other than "
                           "root, or allow user namespaces (Docker: --security-opt seccomp=unconfined; "
                           "sysctl user.max_user_namespaces > 0)")
    return prefix


def start_opensearch(workdir: str | os.PathLike[str], node: OpenSearchNode,
                     cluster: "list[OpenSearchNode]", *, home: Path | None = None,
                     timeout: float = 90.0) -> subprocess.Popen:
    """Start one OpenSearch node of ``cluster`` (opensearch/opensearch.yml) on 127.0.0.1, its
    config, data and log under workdir/opensearch-<name>/; returns once its HTTP port answers
    (the cluster may not have formed yet: see opensearch_health). Started again on the same
    folders, it finds its shards there."""
    folder = Path(workdir) / f"opensearch-{node.name}"
    conf, data, logs = folder / "config", folder / "data", folder / "logs"
    for path in (conf, data, logs):
        path.mkdir(parents=True, exist_ok=True)
    _check_free([node.http, node.transport])
    write_opensearch_config(conf, node, cluster, data_dir=data, logs_dir=logs)
    home = home or fetch_opensearch()
    java, _ = find_java_tools(maven=False)
    argv = [*_as_unprivileged(), java, *OPENSEARCH_JVM_OPTIONS,
            f"-Djava.io.tmpdir={data}", f"-Dopensearch.path.home={home}", f"-Dopensearch.path.conf={conf}",
            "-cp", str(home / "lib" / "*"), "org.opensearch.bootstrap.OpenSearch"]
    t0 = time.monotonic()
    proc = _start(argv, Path(workdir) / f"opensearch-{node.name}.log", f"{node.url}/", timeout)
    _log(f"OpenSearch {OPENSEARCH_VERSION} node {node.name} answers on {LOCALHOST}:{node.http} "
         f"in {time.monotonic() - t0:.1f}s")
    return proc


def opensearch_health(url: str, **params: str) -> dict:
    """GET /_cluster/health of the node at ``url`` (its JSON: status green/yellow/red,
    number_of_nodes, unassigned_shards...); ``params`` such as wait_for_status=green."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    with urllib.request.urlopen(f"{url}/_cluster/health?{query}", timeout=70) as r:
        return json.load(r)


def retention_days(value: "str | int | None" = None) -> int:
    """The days of OpenSearch indices to keep: ``value`` (--retention-days), else
    $STEPSPAN_RETENTION_DAYS, else DEFAULT_RETENTION_DAYS. At least 1: the cleaner given 0
    deletes today's indices too."""
    if value is None:
        value = os.environ.get(ENV_RETENTION_DAYS) or DEFAULT_RETENTION_DAYS
    try:
        days = int(value)
    except ValueError:
        raise BackendError(f"retention days must be a whole number of days, not {value!r} "
                           f"(--retention-days, {ENV_RETENTION_DAYS})") from None
    if days < 1:
        raise BackendError(f"retention days must be at least 1 (today's indices), not {days} "
                           f"(--retention-days, {ENV_RETENTION_DAYS})")
    return days


def _cleaner_deleted(output: str) -> list[str]:
    """The indices es-index-cleaner says it deleted, from its JSON log lines ("Deleting
    indices" lists them; "No indices to delete" when none)."""
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        if record.get("msg") == "Deleting indices":
            return sorted(index["Index"] for index in record["indices"])
        if record.get("msg") == "No indices to delete":
            return []
    raise BackendError(f"es-index-cleaner exited 0 without saying what it deleted:\n{output[-2000:]}")


def run_index_cleaner(binary: Path, urls: "list[str]", days: int, log_path: Path,
                      timeout: float = 300.0) -> list[str]:
    """Jaeger's es-index-cleaner, once, against the first node of ``urls`` that takes it: it
    deletes every daily index (jaeger-{span,service,dependencies,sampling}-YYYY-MM-DD) whose
    creation date is before 00:00 UTC ``days - 1`` days ago, so that today's and those of the
    ``days - 1`` days before stay. It goes by the index's creation date, not the date in its
    name: Jaeger creates a day's index with that day's first span, so the two agree.
    Returns the names of the indices deleted; its own log is appended to ``log_path``."""
    failures = []
    for url in urls:
        proc = subprocess.run([str(binary), str(days), url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(proc.stdout)
        if proc.returncode == 0:
            return _cleaner_deleted(proc.stdout)
        failures.append(f"{url}: exit {proc.returncode}: {proc.stdout.strip()[-500:]}")
    raise BackendError("es-index-cleaner failed on every node: " + "; ".join(failures))


def next_index_cleaning(after: float) -> float:
    """The time (seconds since the epoch) of the first INDEX_CLEANER_UTC after ``after``."""
    hour, minute = INDEX_CLEANER_UTC
    day = int(after // 86400) * 86400
    at = day + hour * 3600 + minute * 60
    return at if at > after else at + 86400


class IndexCleaner:
    """Bounds the fleet's OpenSearch disk: run_index_cleaner at start(), then every day at
    INDEX_CLEANER_UTC in a thread of its own (an hour later again after a failure, which it
    logs), until stop(). What it deletes is logged, and appended with the cleaner's own log to
    ``log_path``."""

    def __init__(self, binary: Path, urls: "list[str]", days: int, log_path: Path) -> None:
        self.binary, self.urls, self.days, self.log_path = binary, list(urls), days, log_path
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> bool:
        """One run, logged; whether it succeeded."""
        try:
            deleted = run_index_cleaner(self.binary, self.urls, self.days, self.log_path)
        except (BackendError, OSError, subprocess.TimeoutExpired) as e:
            _log(f"index cleaner failed, trying again in {INDEX_CLEANER_RETRY_S / 3600:.0f} h: {e}")
            return False
        _log(f"index cleaner (keeps {self.days} days): deleted {len(deleted)} indices"
             + (f": {', '.join(deleted)}" if deleted else ""))
        return True

    def start(self) -> None:
        """The first run now (before returning), the next ones in the thread."""
        succeeded = self.run_once()
        self._thread = threading.Thread(target=self._every_day, args=(succeeded,), name="index-cleaner",
                                        daemon=True)
        self._thread.start()

    def _every_day(self, succeeded: bool) -> None:
        while True:
            now = time.time()
            wait = next_index_cleaning(now) - now
            if not succeeded:
                wait = min(wait, INDEX_CLEANER_RETRY_S)
            if self._stopping.wait(wait):
                return
            succeeded = self.run_once()

    def stop(self) -> None:
        """No further run; waits for one under way (seconds)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(60)


def kafka_group_offsets(broker: str, group: str = KAFKA_GROUP, *, topic: str = KAFKA_TOPIC,
                        libs: Path | None = None) -> dict[int, tuple[int | None, int]]:
    """{partition: (offset ``group`` committed, or None; the partition's end offset)} for
    ``topic``, from Kafka's own consumer-groups tool (ConsumerGroupCommand --describe, as
    `kafka-consumer-groups.sh` runs it): end - committed is what the ingesters have yet to
    store, and where a restarted one resumes; {} while the group has committed nothing. A few
    seconds (a JVM starts)."""
    java, _ = find_java_tools(maven=False)
    argv = [java, "-cp", str((libs or fetch_kafka()) / "*"), "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            "--bootstrap-server", broker, "--describe", "--group", group]
    out = _run(argv, cwd=REPO_ROOT, env=os.environ, what=f"Kafka consumer-groups --describe {group}")
    offsets: dict[int, tuple[int | None, int]] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[0] == group and fields[1] == topic:
            offsets[int(fields[2])] = (None if fields[3] == "-" else int(fields[3]), int(fields[4]))
    return offsets


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) process cannot act on SIGTERM
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL: the process gets no chance to flush or close anything (a crash)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class LocalBackends:
    """The project's Jaeger and Collector on free ports of 127.0.0.1, with their durable state
    (Badger files, the collector's queue) under one directory, each process stoppable, killable
    and restartable on the same ports and state: what `run` serves, and what the fault tests
    break. ``collector_env`` and ``jaeger_env`` add variables to their environments (memory
    limits, retention). Prometheus runs beside them (``start()`` starts it last), scraping the
    collector's span metrics, as the store of Jaeger's Monitor tab (``prometheus_url``).
    ``jaeger_url`` is the search front (jaeger/search_front) in front of Jaeger's query port,
    started with Jaeger; ``jaeger_direct_url`` is Jaeger's own port."""

    def __init__(self, workdir: str | os.PathLike[str], *, secured: bool = False,
                 collector_env: Mapping[str, str] | None = None,
                 jaeger_env: Mapping[str, str] | None = None,
                 ports: "Mapping[str, int] | None" = None,
                 binaries: "Mapping[str, Path] | None" = None,
                 ui_assets: str | os.PathLike[str] | None = None) -> None:
        ports = dict(ports or {})
        reserve_ports(ports)
        self.ui_assets = ui_assets
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.binaries = dict(binaries or ensure_built())
        spare = free_ports(11)
        self.jaeger_ports = JaegerPorts(spare[0], spare[1], spare[2], spare[3], spare[4])
        # The port users know as Jaeger's (UI and API) is the search front's, in front of Jaeger.
        self.front_port = ports.get("jaeger_ui") or free_port()
        self.otlp_grpc = ports.get("otlp_grpc") or spare[5]
        self.otlp_http = ports.get("otlp_http") or spare[6]
        self.metrics = ports.get("metrics") or spare[7]
        self.health = ports.get("health") or spare[8]
        self.internal_metrics = spare[9]
        self.prometheus_port = ports.get("prometheus") or spare[10]
        self.secured = secured
        self.collector_env = dict(collector_env or {})
        self.jaeger_env = dict(jaeger_env or {})
        self.secrets = make_secrets(self.workdir / "secrets") if secured else {}
        self.jaeger: subprocess.Popen | None = None
        self.collector: subprocess.Popen | None = None
        self.prometheus: subprocess.Popen | None = None
        self.front: subprocess.Popen | None = None
        self.jaeger_config = JAEGER_CONFIG  # or jaeger/opensearch.yaml (LocalFleet)
        self.jaeger_overlays: tuple[Path, ...] = ()  # merged over it
        self.write_configs()

    def write_configs(self) -> None:
        """The collector's local config (and the secured overlay)."""
        self.config = write_local_collector_config(
            COLLECTOR_CONFIG, self.workdir / "collector.yaml", self.otlp_grpc, self.otlp_http,
            f"{LOCALHOST}:{self.jaeger_ports.otlp_grpc}", self.metrics, self.health,
            queue_dir=self.workdir / "otelcol_queue", internal_metrics_port=self.internal_metrics)
        self.overlays = (write_local_secured_config(self.workdir / "secured.yaml",
                                                    self.workdir / "secrets"),) if self.secured else ()

    @property
    def scheme(self) -> str:
        return "https" if self.secured else "http"

    @property
    def otlp_grpc_endpoint(self) -> str:
        return f"{self.scheme}://{LOCALHOST}:{self.otlp_grpc}"

    @property
    def otlp_http_endpoint(self) -> str:
        return f"{self.scheme}://{LOCALHOST}:{self.otlp_http}"

    @property
    def jaeger_url(self) -> str:
        """Jaeger's UI and query API as users reach them: through the search front."""
        return f"http://{LOCALHOST}:{self.front_port}"

    @property
    def jaeger_direct_url(self) -> str:
        """Jaeger's own query port, without the front (to show what the front changes)."""
        return f"http://{LOCALHOST}:{self.jaeger_ports.query_http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOCALHOST}:{self.metrics}/metrics"

    @property
    def internal_metrics_url(self) -> str:
        return f"http://{LOCALHOST}:{self.internal_metrics}/metrics"

    @property
    def prometheus_url(self) -> str:
        return f"http://{LOCALHOST}:{self.prometheus_port}"

    def start_jaeger(self) -> None:
        self.jaeger = start_jaeger(self.workdir, self.jaeger_ports, env=self.jaeger_env,
                                   binary=self.binaries["jaeger"], prometheus_url=self.prometheus_url,
                                   ui_assets=self.ui_assets, overlays=self.jaeger_overlays,
                                   src=self.jaeger_config)
        # The search front outlives Jaeger's restarts, as a reverse proxy would (502 meanwhile).
        if self.front is None or self.front.poll() is not None:
            self.start_front()

    def start_front(self) -> None:
        self.front = start_search_front(
            self.front_port, self.jaeger_direct_url, self.workdir / "search_front.log",
            binary=self.binaries.get("search_front"))

    def start_collector(self) -> None:
        self.collector = start_collector(
            self.config, self.health, binary=self.binaries["otelcol"], extra_configs=self.overlays,
            env=self.collector_env,
            other_ports=(self.otlp_grpc, self.otlp_http, self.metrics, self.internal_metrics))

    def start_prometheus(self) -> None:
        self.prometheus = start_prometheus(self.workdir, self.prometheus_port,
                                           f"{LOCALHOST}:{self.metrics}",
                                           binary=self.binaries["prometheus"])

    def start(self) -> "LocalBackends":
        self.start_jaeger()
        try:
            self.start_collector()
            self.start_prometheus()
        except BaseException:
            self.close()
            raise
        return self

    def processes(self) -> "list[subprocess.Popen]":
        """The processes started, in the order they stop (that of :meth:`components`)."""
        return [component.proc for component in self.components()]

    def components(self) -> "list[Component]":
        """Each process started, by name, with what starts it again on the same ports and state
        (what ``run`` does when one exits: :class:`Supervisor`), in the order they stop:
        Prometheus, the collector(s), the search front, Jaeger."""
        return [Component(name, proc, start) for name, proc, start in (
            ("Prometheus", self.prometheus, self.start_prometheus), ("collector", self.collector, self.start_collector),
            ("search front", self.front, self.start_front), ("Jaeger", self.jaeger, self.start_jaeger),
        ) if proc is not None]

    def close(self) -> None:
        for proc in self.processes():
            stop(proc)

    def __enter__(self) -> "LocalBackends":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalFleet(LocalBackends):
    """The fleet tier of docs/scale.md on 127.0.0.1: one agent (collector/agent.yaml) in front of
    ``gateways`` gateways (collector/gateway.yaml), all the fleet Collector; the gateways export
    the traces they keep to Jaeger, and Prometheus (prometheus/prometheus-fleet.yml) scrapes
    every gateway's span metrics. Everything else is LocalBackends': Jaeger, the search front,
    Prometheus, the ports users may fix (``ports``: otlp_grpc, otlp_http and health are the
    agent's, what engines point at; the gateways' ports are picked free). ``collector_env``
    goes to the gateways (STEPSPAN_* policy variables, memory limits), on top of this process's
    environment.

    With ``kafka``, Kafka runs between the gateways and Jaeger (docs/scale.md): one KRaft node
    (kafka/server.properties, its log in workdir/kafka_data, ``ports`` kafka and
    kafka_controller or free ones), the gateways write to it (collector/gateway-kafka.yaml over
    gateway.yaml) and Jaeger ingests from it (jaeger/ingester.yaml over jaeger/config.yaml),
    both told the broker by STEPSPAN_KAFKA_BROKERS. Kafka starts first and stops last.

    With ``opensearch``, Jaeger's store is a cluster of three OpenSearch nodes instead of Badger
    (jaeger/opensearch.yaml instead of jaeger/config.yaml, the data nodes' URLs in
    STEPSPAN_OPENSEARCH_URLS): os1 and os2 hold data, and every index has one replica, so either
    holds every span; all three may manage the cluster, os3 holding nothing but its vote, so that
    the two left after any one is lost still elect a manager and take writes. Their config, data
    and logs are in workdir/opensearch-<node>/.
    They start first (the cluster green before Jaeger starts) and stop last. With
    ``retention_days`` too, an IndexCleaner (Jaeger's es-index-cleaner) keeps that many days of
    indices: it runs once when everything has started, then every day, its log in
    workdir/es-index-cleaner.log; it stops first.

    With ``own_metrics``, the agent and each gateway serve the Collector's own metrics
    (accepted, refused and failed spans per receiver and exporter, the tail sampler's counts) on
    a free port each, listed by ``own_metrics_urls``; without it they are off, as in `run`."""

    def __init__(self, workdir: str | os.PathLike[str], *, gateways: int = 2, kafka: bool = False,
                 opensearch: bool = False, retention_days: int | None = None, own_metrics: bool = False,
                 collector_env: Mapping[str, str] | None = None,
                 jaeger_env: Mapping[str, str] | None = None,
                 ports: "Mapping[str, int] | None" = None,
                 binaries: "Mapping[str, Path] | None" = None,
                 ui_assets: str | os.PathLike[str] | None = None) -> None:
        if gateways < 1:
            raise BackendError("a fleet needs at least one gateway")
        reserve_ports(ports)  # before the fleet's own picks below
        self.gateway_count = gateways
        if retention_days is not None and not opensearch:
            raise BackendError("retention_days is for the OpenSearch store (Badger's is JAEGER_RETENTION)")
        self.own_metrics_urls: dict[str, str] = {}  # agent, gateway-1, ... -> URL (with own_metrics)
        self.own_metrics = own_metrics
        wanted = ("jaeger", "prometheus", "search_front", "otelcol_gateway", *(("kafka",) if kafka else ()),
                  *(("opensearch",) if opensearch else ()),
                  *(("es_index_cleaner",) if retention_days is not None else ()))
        binaries = dict(binaries or ensure_built(wanted))
        self.gateways: list[subprocess.Popen] = []
        self.agent: subprocess.Popen | None = None
        self.kafka: subprocess.Popen | None = None
        self.kafka_ports: KafkaPorts | None = None
        collector_env, jaeger_env = dict(collector_env or {}), dict(jaeger_env or {})
        if kafka:
            ports = dict(ports or {})
            self.kafka_ports = KafkaPorts(ports.pop("kafka", None) or free_port(),
                                          ports.pop("kafka_controller", None) or free_port())
            collector_env[ENV_KAFKA_BROKERS] = jaeger_env[ENV_KAFKA_BROKERS] = self.kafka_broker
        self.opensearch_nodes: list[OpenSearchNode] = []
        self.opensearch: dict[str, subprocess.Popen] = {}
        self.retention_days = retention_days
        self.index_cleaner: IndexCleaner | None = None
        if opensearch:
            http1, transport1, http2, transport2, http3, transport3 = free_ports(6)
            self.opensearch_nodes = [OpenSearchNode("os1", http1, transport1), OpenSearchNode("os2", http2, transport2),
                                     OpenSearchNode("os3", http3, transport3, holds_data=False)]
            jaeger_env[ENV_OPENSEARCH_URLS] = "[" + ", ".join(self.opensearch_urls) + "]"
        super().__init__(workdir, collector_env=collector_env, jaeger_env=jaeger_env, ports=ports,
                         binaries=binaries, ui_assets=ui_assets)
        self.gateway_overlays: tuple[Path, ...] = (GATEWAY_KAFKA_CONFIG,) if kafka else ()
        self.jaeger_config = JAEGER_OPENSEARCH_CONFIG if opensearch else JAEGER_CONFIG
        self.jaeger_overlays = (JAEGER_INGESTER_CONFIG,) if kafka else ()

    @property
    def opensearch_urls(self) -> list[str]:
        """The HTTP URLs of the OpenSearch nodes that hold data (with ``opensearch``), what
        Jaeger is given: the tie-breaker os3 serves no client."""
        return [node.url for node in self.opensearch_nodes if node.holds_data]

    def opensearch_url(self, name: str) -> str:
        """The HTTP URL of the OpenSearch node ``name`` (os1, os2, os3)."""
        for node in self.opensearch_nodes:
            if node.name == name:
                return node.url
        raise BackendError(f"no OpenSearch node {name!r} in this fleet ({[n.name for n in self.opensearch_nodes]})")

    def start_opensearch(self, name: str | None = None) -> None:
        """Start the OpenSearch node ``name`` (os1, os2, os3; by default every node not running),
        then wait until the cluster has every node and every shard assigned (green)."""
        nodes = [n for n in self.opensearch_nodes if n.name == name or
                 (name is None and (n.name not in self.opensearch or self.opensearch[n.name].poll() is not None))]
        if not nodes:
            raise BackendError(f"no OpenSearch node {name!r} in this fleet ({[n.name for n in self.opensearch_nodes]})")
        t0 = time.monotonic()
        for node in nodes:
            self.opensearch[node.name] = start_opensearch(self.workdir, node, self.opensearch_nodes,
                                                          home=self.binaries["opensearch"])
        health = opensearch_health(nodes[0].url, wait_for_status="green",
                                   wait_for_nodes=str(len(self.opensearch_nodes)), timeout="60s")
        if health["status"] != "green" or health["number_of_nodes"] != len(self.opensearch_nodes):
            raise BackendError(f"OpenSearch cluster not green with every node after 60 s: {health}")
        _log(f"OpenSearch cluster green with {health['number_of_nodes']} nodes {time.monotonic() - t0:.1f}s after "
             f"starting {', '.join(n.name for n in nodes)}")

    @property
    def kafka_broker(self) -> str:
        """host:port of the Kafka broker (with ``kafka``)."""
        if self.kafka_ports is None:
            raise BackendError("this fleet runs without Kafka")
        return f"{LOCALHOST}:{self.kafka_ports.broker}"

    def start_kafka(self) -> None:
        """Kafka on its ports and data dir (started again after a stop or a kill, it keeps every
        record and committed offset)."""
        if self.kafka_ports is None:
            raise BackendError("this fleet runs without Kafka")
        self.kafka = start_kafka(self.workdir, self.kafka_ports, libs=self.binaries["kafka"])

    def start(self) -> "LocalFleet":
        """Kafka (if any) first: the gateways and Jaeger's ingester connect to it; then the rest
        as LocalBackends starts it. Anything started is stopped again if a start fails."""
        try:
            if self.opensearch_nodes:
                self.start_opensearch()
            if self.kafka_ports is not None:
                self.start_kafka()
            super().start()
            if self.retention_days is not None:
                self.index_cleaner = IndexCleaner(self.binaries["es_index_cleaner"], self.opensearch_urls,
                                                  self.retention_days, self.workdir / "es-index-cleaner.log")
                self.index_cleaner.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """The index cleaner first (it talks to OpenSearch), then the processes."""
        if self.index_cleaner is not None:
            self.index_cleaner.stop()
            self.index_cleaner = None
        super().close()

    def write_configs(self) -> None:
        """The gateways' configs (each exporting to Jaeger), then the agent's, listing them."""
        self.gateway_configs: list[tuple[Path, int, tuple[int, ...]]] = []  # config, health port, others
        self.gateway_otlp: list[str] = []
        self.gateway_metrics: list[str] = []
        self.own_metrics_urls = {}
        for i in range(1, self.gateway_count + 1):
            grpc, http, metrics, health = free_ports(4)
            own = self._own_metrics_port(f"gateway-{i}")
            config = write_local_collector_config(
                GATEWAY_CONFIG, self.workdir / f"gateway-{i}.yaml", grpc, http,
                f"{LOCALHOST}:{self.jaeger_ports.otlp_grpc}", metrics, health,
                queue_dir=self.workdir / f"gateway-{i}_queue", internal_metrics_port=own)
            self.gateway_configs.append((config, health, (grpc, http, metrics, *([own] if own else []))))
            self.gateway_otlp.append(f"{LOCALHOST}:{grpc}")
            self.gateway_metrics.append(f"{LOCALHOST}:{metrics}")
        self.agent_own_metrics = self._own_metrics_port("agent")
        self.config = write_local_agent_config(
            AGENT_CONFIG, self.workdir / "agent.yaml", self.otlp_grpc, self.otlp_http,
            self.gateway_otlp, self.health, queue_dir=self.workdir / "agent_queue",
            internal_metrics_port=self.agent_own_metrics)
        self.overlays = ()

    def _own_metrics_port(self, name: str) -> int | None:
        """A free port for collector ``name``'s own metrics, noted in own_metrics_urls; None
        (off) without ``own_metrics``."""
        if not self.own_metrics:
            return None
        port = free_port()
        self.own_metrics_urls[name] = f"http://{LOCALHOST}:{port}/metrics"
        return port

    @property
    def metrics_urls(self) -> list[str]:
        """Each gateway's span metrics (Prometheus scrapes them all)."""
        return [f"http://{target}/metrics" for target in self.gateway_metrics]

    def start_collector(self) -> None:
        """The gateways first (the agent's queue would hold the spans meanwhile, but a gateway
        that fails to start is told at once), then the agent."""
        self.gateways = []
        for index in range(len(self.gateway_configs)):
            self.start_gateway(index)
        self.start_agent()

    def start_agent(self) -> None:
        """The agent on its ports and queue: started again, it finds what it held on disk."""
        self.agent = self.collector = start_collector(
            self.config, self.health, binary=self.binaries["otelcol_gateway"],
            other_ports=(self.otlp_grpc, self.otlp_http, *([self.agent_own_metrics] if self.agent_own_metrics else [])))

    def start_gateway(self, index: int, extra_configs: "tuple[Path, ...]" = ()) -> None:
        """Gateway ``index`` (from 0) on its config, ports and queue, with ``extra_configs`` merged
        over them; started again after a stop or a kill, it is the same gateway to the agents (the
        same endpoint on their ring) and finds its queue on disk."""
        config, health, others = self.gateway_configs[index]
        proc = start_collector(config, health, binary=self.binaries["otelcol_gateway"], env=self.collector_env,
                               other_ports=others, extra_configs=(*self.gateway_overlays, *extra_configs))
        if index < len(self.gateways):
            self.gateways[index] = proc
        else:
            self.gateways.append(proc)

    def start_prometheus(self) -> None:
        self.prometheus = start_prometheus(self.workdir, self.prometheus_port, self.gateway_metrics,
                                           binary=self.binaries["prometheus"], src=PROMETHEUS_FLEET_CONFIG)

    def components(self) -> "list[Component]":
        """In the order they stop: Prometheus, the agent (it flushes to the gateways), the
        gateways (they flush to Jaeger or Kafka), the search front, Jaeger (an ingester commits
        its offsets), Kafka, the OpenSearch nodes (the data node before the cluster manager)."""
        named = [("Prometheus", self.prometheus, self.start_prometheus), ("agent", self.agent, self.start_agent)]
        named += [(f"gateway-{i}", proc, functools.partial(self.start_gateway, i - 1))
                  for i, proc in enumerate(self.gateways, 1)]
        named += [("search front", self.front, self.start_front), ("Jaeger", self.jaeger, self.start_jaeger),
                  ("Kafka", self.kafka, self.start_kafka)]
        named += [(f"OpenSearch {name}", proc, functools.partial(self.start_opensearch, name))
                  for name, proc in reversed(self.opensearch.items())]
        return [Component(name, proc, start) for name, proc, start in named if proc is not None]


def validate_collector_config(config: Path = COLLECTOR_CONFIG, *overlays: Path,
                              binary: Path | None = None) -> None:
    """`otelcol validate` on a config (and overlays merged on top of it), with ``binary`` (by
    default the project's collector; the fleet configs need the fleet Collector)."""
    binary = binary or ensure_built(("otelcol",))["otelcol"]
    argv = [str(binary), "validate", f"--config={config}", *(f"--config={o}" for o in overlays)]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise BackendError(f"collector rejects {config} {' '.join(map(str, overlays))}:\n{proc.stdout}")


def validate_jaeger_config(config: Path = JAEGER_CONFIG, *overlays: Path) -> None:
    """`jaeger validate` on a config (jaeger/config.yaml, jaeger/opensearch.yaml) and overlays
    merged on top of it (jaeger/ingester.yaml)."""
    binary = ensure_built(("jaeger",))["jaeger"]
    argv = [str(binary), "validate", f"--config={config}", *(f"--config={o}" for o in overlays)]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise BackendError(f"Jaeger rejects {config} {' '.join(map(str, overlays))}:\n{proc.stdout}")


# --------------------------------------------------------------------------- CLI


# The Compose Specification's JSON schema, as Docker Compose itself loads it (compose-go).
COMPOSE_GO_MODULE = "github.com/compose-spec/compose-go/v2"
COMPOSE_GO_VERSION = "v2.16.2"


def compose_schema() -> Path:
    """Path of the Compose Specification JSON schema, downloaded with compose-go when missing."""
    go = find_go()
    out = _run([go, "mod", "download", "-json", f"{COMPOSE_GO_MODULE}@{COMPOSE_GO_VERSION}"],
               cwd=REPO_ROOT, env=_go_env(go), what="download the Compose schema (compose-go)")
    schema = Path(json.loads(out)["Dir"]) / "schema" / "compose-spec.json"
    if not schema.is_file():
        raise BackendError(f"compose-go {COMPOSE_GO_VERSION} has no schema/compose-spec.json")
    return schema


def _cmd_paths(_: argparse.Namespace) -> int:
    v = pinned_versions()
    print(f"collector {v.collector} (ocb v{v.collector}); jaeger {v.jaeger} "
          f"({JAEGER_MODULE}@{v.jaeger_module}); prometheus {v.prometheus} "
          f"({PROMETHEUS_MODULE}@{v.prometheus_module}); fleet collector {gateway_version()} "
          f"(ocb v{gateway_version()}, built with --fleet)")
    for name, p in binary_paths(v).items():
        print(f"{name}\t{p}\t{'built' if p.is_file() else 'missing'}")
    libs = kafka_libs_dir()
    print(f"kafka\t{libs}\t{'fetched' if libs.is_dir() else 'missing'} (Kafka {KAFKA_VERSION}'s jars)")
    home = opensearch_home()
    print(f"opensearch\t{home}\t{'fetched' if home.is_dir() else 'missing'} (OpenSearch {OPENSEARCH_VERSION}'s jars)")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    components = tuple(args.only or ("otelcol", "jaeger", "prometheus", "search_front"))
    if args.fleet:
        components += tuple(c for c in ("otelcol_gateway", "es_index_cleaner") if c not in components)
    if args.fleet and "kafka" not in components:
        try:
            find_java_tools()
            components += ("kafka", "opensearch")
        except BackendError as e:  # the Kafka and OpenSearch tests then skip (fail in CI), saying why
            _log(f"Kafka and OpenSearch not fetched: {e}")
    for name, p in ensure_built(components, force=args.force).items():
        print(f"{name}\t{p}")
    if not args.only:
        print(f"compose-schema\t{compose_schema()}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    """Every collector config the project ships: the plain one, and the secured overlay on it;
    with --fleet, the agent's and the gateway's too (with the fleet Collector)."""
    for config, *overlays in ([Path(args.config)], [Path(args.config), SECURED_CONFIG]):
        validate_collector_config(config, *overlays)
        print(f"{' + '.join(map(str, (config, *overlays)))}: valid")
    if args.fleet:
        for config, *overlays in ([AGENT_CONFIG], [GATEWAY_CONFIG], [GATEWAY_CONFIG, GATEWAY_KAFKA_CONFIG]):
            validate_collector_config(config, *overlays,
                                      binary=ensure_built(("otelcol_gateway",))["otelcol_gateway"])
            print(f"{' + '.join(map(str, (config, *overlays)))}: valid")
        for config in (JAEGER_CONFIG, JAEGER_OPENSEARCH_CONFIG):
            validate_jaeger_config(config, JAEGER_INGESTER_CONFIG)
            print(f"{config} + {JAEGER_INGESTER_CONFIG}: valid")
    return 0


def _cmd_secrets(args: argparse.Namespace) -> int:
    for name, path in make_secrets(Path(args.dir)).items():
        print(f"{name}\t{path}")
    return 0


def data_dir(fleet: bool = False) -> Path:
    """Where `run` keeps Jaeger's Badger files and the collector's queue between runs; `run
    --fleet` keeps its own beside it (backends-fleet)."""
    env = os.environ.get("OTEL_STEPSPAN_DATA_DIR")
    path = Path(env).expanduser() if env else Path.home() / ".local" / "share" / "otel_stepspan" / "backends"
    return path.with_name(path.name + "-fleet") if fleet else path


def _stop_on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Component(NamedTuple):
    """A process of a local stack: its name, the process, and what starts it again."""

    name: str
    proc: subprocess.Popen
    start: Callable[[], None]


def exit_reason(returncode: int) -> str:
    """``exit code 2``, or ``killed by SIGKILL`` for a process a signal ended."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


#: A backend that exits more often than this within RESTART_WINDOW_S is given up on.
RESTART_LIMIT = 5
RESTART_WINDOW_S = 300.0


class Supervisor:
    """What ``run`` does while it serves: a backend that exits is started again on its ports
    and state, as compose's ``restart: unless-stopped`` does there, with a line naming it, why
    it ended and its log. A gateway killed in a fleet is back on the agents' ring in seconds
    (their queues hold its share meanwhile) rather than its share waiting out the agents'
    retries. One that exits more than ``limit`` times within ``window_s`` seconds is given up
    on: ``check`` raises, and ``run`` stops the rest and fails naming it."""

    def __init__(self, stack: "LocalBackends", *, limit: int = RESTART_LIMIT, window_s: float = RESTART_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stack = stack
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.exits: dict[str, list[float]] = {}

    def check(self) -> list[str]:
        """Start again every component found ended; the lines said about them."""
        said = []
        for component in self.stack.components():
            code = component.proc.poll()
            if code is None:
                continue
            now = self.clock()
            exits = [t for t in self.exits.get(component.name, []) if now - t < self.window_s] + [now]
            self.exits[component.name] = exits
            log = getattr(component.proc, "log_path", None)
            where = f" (log: {log})" if log else ""
            if len(exits) > self.limit:
                raise BackendError(f"{component.name} ended {len(exits)} times in {self.window_s:.0f} s, the last "
                                   f"with {exit_reason(code)}; not started again{where}")
            said.append(f"{component.name} ended ({exit_reason(code)}); starting it again{where}")
            _log(said[-1])
            try:
                component.start()
            except BackendError as error:  # told, and tried again at the next check
                said.append(f"{component.name} did not start again: {error}")
                _log(said[-1])
        return said


def _cmd_run(args: argparse.Namespace) -> int:
    if args.fleet and args.secured:
        raise BackendError("--secured is for the single collector; the fleet's agent takes plain OTLP")
    if args.gateways is not None and not args.fleet:
        raise BackendError("--gateways needs --fleet")
    if args.kafka and not args.fleet:
        raise BackendError("--kafka needs --fleet: Kafka sits between the fleet's gateways and Jaeger")
    if args.opensearch and not args.fleet:
        raise BackendError("--opensearch needs --fleet: it is the store of the fleet's Jaeger")
    if args.retention_days is not None and not args.opensearch:
        raise BackendError("--retention-days needs --opensearch: it deletes old OpenSearch indices "
                           "(Badger's retention is JAEGER_RETENTION)")
    keep_days = retention_days(args.retention_days) if args.opensearch else None
    workdir = Path(args.data_dir or data_dir(args.fleet))
    # Ctrl-C, `kill` and a service manager's SIGTERM all stop the backends it started; SIGINT is
    # set explicitly because a shell starting this in the background (`... &`) ignores it.
    signal.signal(signal.SIGINT, _stop_on_signal)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    ports = {"otlp_grpc": args.otlp_grpc_port, "otlp_http": args.otlp_http_port,
             "metrics": args.metrics_port, "health": args.health_port, "jaeger_ui": args.jaeger_ui_port,
             "prometheus": args.prometheus_port}
    if args.fleet:
        ports.pop("metrics")  # each gateway has its own, picked free and printed
        if args.kafka:
            ports.update(kafka=args.kafka_port, kafka_controller=args.kafka_controller_port)
        stack: LocalBackends = LocalFleet(workdir, gateways=2 if args.gateways is None else args.gateways, ports=ports,
                                          kafka=args.kafka, opensearch=args.opensearch, retention_days=keep_days,
                                          ui_assets=args.ui_assets)
    else:
        stack = LocalBackends(workdir, secured=args.secured, ports=ports, ui_assets=args.ui_assets)
    with stack:
        if isinstance(stack, LocalFleet):
            tier = "".join(f"gateway {i}  OTLP gRPC {otlp}, span metrics {url}\n" for i, (otlp, url) in
                           enumerate(zip(stack.gateway_otlp, stack.metrics_urls), 1))
            print(f"agent      OTLP gRPC {stack.otlp_grpc_endpoint}, OTLP HTTP {stack.otlp_http_endpoint}\n"
                  f"engine     OTEL_EXPORTER_OTLP_ENDPOINT={stack.otlp_grpc_endpoint} (the agent)\n{tier}"
                  + (f"Kafka      {stack.kafka_broker}, topic {KAFKA_TOPIC} (the gateways write the kept "
                     f"traces; Jaeger ingests them as consumer group {KAFKA_GROUP})\n" if args.kafka else "") +
                  (f"OpenSearch {', '.join(stack.opensearch_urls)} (Jaeger's store: data nodes os1, os2, one replica; "
                   f"os3 on {stack.opensearch_url('os3')} only votes; "
                   f"indices jaeger-span-YYYY-MM-DD, jaeger-service-YYYY-MM-DD, the last {keep_days} days kept: "
                   f"es-index-cleaner at start and daily at {INDEX_CLEANER_UTC[0]:02d}:{INDEX_CLEANER_UTC[1]:02d} "
                   f"UTC)\n" if args.opensearch else "") +
                  f"Jaeger     {stack.jaeger_url}/api/v3/services (the kept traces, through the search front; "
                  f"Jaeger itself on {stack.jaeger_direct_url})\n"
                  f"Prometheus {stack.prometheus_url} (every gateway's span metrics; Jaeger's Monitor tab)\n"
                  f"data, logs {workdir}", flush=True)
        else:
            print(f"OTLP gRPC  {stack.otlp_grpc_endpoint}\nOTLP HTTP  {stack.otlp_http_endpoint}\n"
                  f"Jaeger     {stack.jaeger_url}/api/v3/services (UI and API, through the search front; "
                  f"Jaeger itself on {stack.jaeger_direct_url})\n"
                  f"metrics    {stack.metrics_url}\nPrometheus {stack.prometheus_url} (Jaeger's Monitor tab)\n"
                  f"data, logs {workdir}", flush=True)
        if args.secured:
            print(f"engine     OTEL_EXPORTER_OTLP_CERTIFICATE={workdir / 'secrets' / 'ca.crt'}\n"
                  f"           OTEL_EXPORTER_OTLP_HEADERS=\"authorization=Bearer%20$(cat "
                  f"{workdir / 'secrets' / 'token'})\"", flush=True)
        supervisor = Supervisor(stack)
        try:
            while True:
                time.sleep(0.5)
                supervisor.check()
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the missing binaries, print their paths")
    b.add_argument("--only", action="append",
                   choices=["otelcol", "jaeger", "prometheus", "search_front", "otelcol_gateway",
                            "es_index_cleaner", "kafka", "opensearch"])
    b.add_argument("--fleet", action="store_true",
                   help="also build the fleet Collector (collector/agent.yaml, collector/gateway.yaml) and "
                        "Jaeger's es-index-cleaner (the OpenSearch indices' retention), and fetch Kafka's and OpenSearch's jars with Maven (skipped, with a line saying so, without "
                        "java and mvn)")
    b.add_argument("--force", action="store_true", help="rebuild even if present")
    b.set_defaults(func=_cmd_build)
    sub.add_parser("paths", help="print binary paths, build nothing").set_defaults(func=_cmd_paths)
    va = sub.add_parser("validate", help="otelcol validate the collector configs (plain, secured)")
    va.add_argument("--config", default=str(COLLECTOR_CONFIG))
    va.add_argument("--fleet", action="store_true",
                    help="also validate collector/agent.yaml, collector/gateway.yaml, and the Kafka overlays "
                         "collector/gateway-kafka.yaml and jaeger/ingester.yaml (over jaeger/config.yaml and "
                         "jaeger/opensearch.yaml; builds the fleet Collector)")
    va.set_defaults(func=_cmd_validate)
    se = sub.add_parser("secrets", help="make a CA, a server certificate and a token (kept if present)")
    se.add_argument("--dir", default=str(SECRETS_DIR))
    se.set_defaults(func=_cmd_secrets)
    r = sub.add_parser(
        "run", help="run Jaeger (Badger) + collector + Prometheus on 127.0.0.1 until Ctrl-C; "
                    "--fleet: an agent + gateways instead of the collector",
        description="Run the backends on 127.0.0.1, without Docker, until Ctrl-C or SIGTERM (which stop "
                    "everything started). A backend that ends meanwhile is started again on its ports and "
                    f"state, with a line on stderr; one that ends more than {RESTART_LIMIT} times in "
                    f"{RESTART_WINDOW_S / 60:.0f} minutes stops the run (exit 1). Plain: one Collector (collector/config.yaml) in front of Jaeger, "
                    "and Prometheus scraping its span metrics. --fleet: the tier of docs/scale.md "
                    "instead of that Collector: one agent (collector/agent.yaml: engines point "
                    "OTEL_EXPORTER_OTLP_ENDPOINT at its OTLP ports) load-balancing by trace id onto N "
                    "gateways (collector/gateway.yaml: span metrics of every span, then tail sampling "
                    "into Jaeger), and Prometheus (prometheus/prometheus-fleet.yml) scraping every "
                    "gateway, read by Jaeger's Monitor tab; the gateways' ports are picked free and "
                    "printed, and they read the policy variables (STEPSPAN_DECISION_WAIT, "
                    "STEPSPAN_SLOW_DECODE_MS, STEPSPAN_KEEP_PERCENT, ...) from this environment. "
                    "--fleet --kafka: Kafka too (kafka/server.properties, one KRaft node on --kafka-port), "
                    f"the gateways write the traces they keep to its topic {KAFKA_TOPIC} "
                    "(collector/gateway-kafka.yaml) and Jaeger ingests them from there "
                    "(jaeger/ingester.yaml) into the same store its query reads; Kafka starts first and "
                    "stops last, and its records and offsets stay in DATA_DIR/kafka_data. "
                    "--fleet --opensearch: Jaeger's store is a cluster of three OpenSearch 2.19 nodes "
                    "(opensearch/opensearch.yml, jaeger/opensearch.yaml: daily indices, one replica; os1 and "
                    "os2 hold the data, os3 only votes, so that any one node can be lost) instead "
                    "of Badger, on ports picked free and printed; they start first (about 15 s, until the "
                    "cluster is green) and stop last, their data in DATA_DIR/opensearch-os1, -os2, -os3; "
                    "Jaeger's es-index-cleaner deletes the indices older than --retention-days at start and "
                    "every day (its log in DATA_DIR/es-index-cleaner.log). "
                    "Binaries missing from the cache are built first (the fleet Collector: minutes; "
                    "Kafka's and OpenSearch's jars: seconds, with java and mvn).")
    r.add_argument("--fleet", action="store_true",
                   help="an agent and gateways (docs/scale.md) instead of the single collector")
    r.add_argument("--gateways", type=int, metavar="N",
                   help="with --fleet: how many gateways (default 2)")
    r.add_argument("--kafka", action="store_true",
                   help=f"with --fleet: Kafka between the gateways and Jaeger (one KRaft node from Maven "
                        f"Central's jars, fetched when missing; topic {KAFKA_TOPIC}); Jaeger ingests from it")
    r.add_argument("--opensearch", action="store_true",
                   help="with --fleet: Jaeger stores in two OpenSearch nodes (Maven Central's jars, fetched when "
                        "missing; one replica) instead of Badger")
    r.add_argument("--retention-days", type=int, metavar="N",
                   help=f"with --opensearch: keep the last N days of indices, today included (default "
                        f"${ENV_RETENTION_DAYS} or {DEFAULT_RETENTION_DAYS}); Jaeger's es-index-cleaner deletes "
                        f"older ones at start and daily at {INDEX_CLEANER_UTC[0]:02d}:{INDEX_CLEANER_UTC[1]:02d} UTC")
    r.add_argument("--kafka-port", type=int, default=9092, help="with --kafka: the broker's")
    r.add_argument("--kafka-controller-port", type=int, default=9093,
                   help="with --kafka: the KRaft controller's")
    r.add_argument("--otlp-grpc-port", type=int, default=4317, help="the collector's, or with --fleet the agent's")
    r.add_argument("--otlp-http-port", type=int, default=4318, help="the collector's, or with --fleet the agent's")
    r.add_argument("--metrics-port", type=int, default=8889,
                   help="the collector's span metrics (not with --fleet: each gateway's port is picked free)")
    r.add_argument("--health-port", type=int, default=13133, help="the collector's, or with --fleet the agent's")
    r.add_argument("--jaeger-ui-port", type=int, default=16686)
    r.add_argument("--prometheus-port", type=int, default=9090)
    r.add_argument("--data-dir",
                   help="Badger files, the collectors' queues, logs (kept between runs; default "
                        "$OTEL_STEPSPAN_DATA_DIR or ~/.local/share/otel_stepspan/backends, with --fleet "
                        "the same path ending in backends-fleet)")
    r.add_argument("--ui-assets", metavar="DIR",
                   help="a built jaeger-ui to serve (the directory with its index.html, e.g. "
                        "packages/jaeger-ui/build of the jaeger-ui repository after npm ci && npm run "
                        "build); without it the Go-built Jaeger serves a placeholder page, the API is whole")
    r.add_argument("--secured", action="store_true",
                   help="OTLP over TLS with a bearer token (secrets made in DATA_DIR/secrets)")
    r.set_defaults(func=_cmd_run)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
