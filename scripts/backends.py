#!/usr/bin/env python3
"""Build and run the project's real backends without Docker.

The OpenTelemetry Collector (built with the Collector Builder, ocb, from
collector/builder-config.yaml) and Jaeger v2 (cmd/jaeger) are built from their Go
modules, through the Go module proxy, into a cache directory outside git:

    ${OTEL_STEPSPAN_BACKENDS_DIR:-~/.cache/otel_stepspan/backends}/<component>-<version>/

The versions come from ONE place: the image tags in docker-compose.yml
(otel/opentelemetry-collector-contrib:<X> and jaegertracing/jaeger:<Y>).
collector/builder-config.yaml is checked against the collector tag.

CLI (stdlib only, Python >= 3.10):
    python scripts/backends.py build      # build what is missing, print the paths
    python scripts/backends.py paths      # print the paths (and whether built), build nothing
    python scripts/backends.py validate   # `otelcol validate` on collector/config.yaml
    python scripts/backends.py run        # Jaeger (memstore) + collector on 127.0.0.1; Ctrl-C stops

From Python (e.g. pytest):
    paths = ensure_built()                      # {"otelcol": Path, "jaeger": Path}
    write_local_collector_config(src, dst, ...) # the project's config, local endpoints only
    jaeger = start_jaeger(workdir, ports)       # Popen, healthy when it returns
    collector = start_collector(config, ...)

Findings that shaped this script (Go 1.26, proxy as seen 2026-11):
  * Collector: `go install go.opentelemetry.io/collector/cmd/builder@v0.155.0` works; ocb
    then resolves and builds the components. v0.155.0 is the newest release whose
    prometheusexporter module the proxy serves.
  * Jaeger v2 is not a /v2 module: release v2.13.0 is the Go module
    github.com/jaegertracing/jaeger v1.76.0 (v2.N.P <-> v1.(N+63).P; the module's
    CHANGELOG.md line "v1.76.0 / v2.13.0" is checked). `go install
    github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0` FAILS: "The go.mod file for the
    module providing named packages contains one or more replace directives" (it replaces
    github.com/Shopify/sarama). Working form: a throw-away module that copies Jaeger's
    replace directives, `go get github.com/jaegertracing/jaeger/cmd/jaeger@v1.76.0`, then
    `go build ... github.com/jaegertracing/jaeger/cmd/jaeger`. Jaeger's own go.sum must be
    copied into it first: without it, `go get` fails with "verifying module: ... reading
    .../sumdb/sum.golang.org/lookup/...: 404 Not Found" for several collector v0.140
    modules (the checksum database is not reachable for them here); with Jaeger's go.sum
    the hashes are checked against Jaeger's pinned sums instead.
  * A Jaeger built from the Go module serves a placeholder page instead of the real UI
    (the UI assets are a git submodule built only for release images). The query APIs
    (/api/v3/*, /api/*) are complete.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COLLECTOR_DIR = REPO_ROOT / "collector"
COLLECTOR_CONFIG = COLLECTOR_DIR / "config.yaml"
BUILDER_CONFIG = COLLECTOR_DIR / "builder-config.yaml"

COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib"
JAEGER_IMAGE = "jaegertracing/jaeger"
OCB_MODULE = "go.opentelemetry.io/collector/cmd/builder"
JAEGER_MODULE = "github.com/jaegertracing/jaeger"
JAEGER_PACKAGE = JAEGER_MODULE + "/cmd/jaeger"
# Jaeger releases v2.N.P as Go module tag v1.(N+63).P (v2.1.0 = v1.64.0, v2.13.0 = v1.76.0).
JAEGER_V1_OFFSET = 63

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

    @property
    def jaeger_module(self) -> str:
        """Go module version of the Jaeger release (v2.13.0 -> v1.76.0)."""
        m = re.fullmatch(r"2\.(\d+)\.(\d+)", self.jaeger)
        if not m:
            raise BackendError(f"unexpected Jaeger v2 version {self.jaeger!r} in {COMPOSE_FILE}")
        return f"v1.{int(m.group(1)) + JAEGER_V1_OFFSET}.{m.group(2)}"


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


def _builder_dist(text: str) -> tuple[str, str]:
    """(name, output_path) of the ocb manifest's dist section."""
    name = re.search(r"^\s+name:\s*[\"']?([^\s\"']+)", text, re.M)
    out = re.search(r"^\s+output_path:\s*[\"']?([^\s\"']+)", text, re.M)
    if not name or not out:
        raise BackendError(f"{BUILDER_CONFIG}: dist.name and dist.output_path are required")
    return name.group(1), out.group(1)


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
        "jaeger": root / f"jaeger-{v.jaeger}" / "jaeger",
    }


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


def build_collector(versions: Versions | None = None, *, force: bool = False) -> Path:
    """Build the collector with ocb from collector/builder-config.yaml (if missing/stale)."""
    v = versions or pinned_versions()
    binary = binary_paths(v)["otelcol"]
    workdir = backends_dir() / f"otelcol-{v.collector}"
    stamp = workdir / "builder-config.sha256"
    digest = _sha256(BUILDER_CONFIG)
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
            _log(f"installing ocb {OCB_MODULE}@v{v.collector} into {bindir}")
            _run([go, "install", f"{OCB_MODULE}@v{v.collector}"], cwd=workdir, env=env,
                 what="go install ocb")
        _log(f"building the collector v{v.collector} with ocb (a few minutes on 2 cores)")
        # ocb writes dist.output_path relative to its working directory: the cache dir.
        _run([str(ocb), f"--config={BUILDER_CONFIG}"], cwd=workdir, env=env, what="ocb build")
        if not binary.is_file():
            raise BackendError(f"ocb finished but {binary} is missing")
        stamp.write_text(digest)
        _log(f"collector built in {time.monotonic() - t0:.0f}s: {binary} "
             f"({binary.stat().st_size / 2**20:.1f} MiB)")
    return binary


def build_jaeger(versions: Versions | None = None, *, force: bool = False) -> Path:
    """Build Jaeger v2 (cmd/jaeger) from its Go module (if missing)."""
    v = versions or pinned_versions()
    binary = binary_paths(v)["jaeger"]
    workdir = binary.parent
    modver = v.jaeger_module
    with _lock(workdir.with_name(workdir.name + ".lock")):
        if binary.is_file() and not force:
            return binary
        go = find_go()
        workdir.mkdir(parents=True, exist_ok=True)
        env = _go_env(go)
        t0 = time.monotonic()
        _log(f"downloading {JAEGER_MODULE}@{modver} (Jaeger v{v.jaeger})")
        with tempfile.TemporaryDirectory(prefix="jaeger-dl-") as empty:
            info = json.loads(_run([go, "mod", "download", "-json", f"{JAEGER_MODULE}@{modver}"],
                                   cwd=Path(empty), env=env, what="go mod download jaeger"))
        moddir = Path(info["Dir"])
        changelog = (moddir / "CHANGELOG.md").read_text(encoding="utf-8", errors="replace")
        if f"{modver} / v{v.jaeger}" not in changelog:
            raise BackendError(f"{JAEGER_MODULE}@{modver} is not Jaeger v{v.jaeger} "
                               f"(no '{modver} / v{v.jaeger}' in its CHANGELOG.md)")
        upstream = json.loads(_run([go, "mod", "edit", "-json", str(moddir / "go.mod")],
                                   cwd=workdir, env=env, what="go mod edit -json"))
        src = workdir / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir()
        # A throw-away main module: `go install pkg@version` refuses Jaeger (replace directives).
        lines = ["module local/otel-stepspan-jaeger-build", "", f"go {upstream['Go']}", ""]
        for r in upstream.get("Replace") or []:
            old = r["Old"]["Path"] + (" " + r["Old"]["Version"] if r["Old"].get("Version") else "")
            new = r["New"]["Path"] + (" " + r["New"]["Version"] if r["New"].get("Version") else "")
            lines.append(f"replace {old} => {new}")
        (src / "go.mod").write_text("\n".join(lines) + "\n")
        # Jaeger's own go.sum: verified hashes for its whole dependency graph.
        shutil.copyfile(moddir / "go.sum", src / "go.sum")
        os.chmod(src / "go.sum", 0o644)
        _run([go, "get", f"{JAEGER_PACKAGE}@{modver}"], cwd=src, env=env, what="go get jaeger")
        _log(f"compiling Jaeger v{v.jaeger} (a few minutes on 2 cores)")
        tmp = workdir / "jaeger.tmp"
        ldflags = f"-s -w -X {JAEGER_MODULE}/internal/version.latestVersion=v{v.jaeger}"
        _run([go, "build", "-trimpath", "-ldflags", ldflags, "-o", str(tmp), JAEGER_PACKAGE],
             cwd=src, env=env, what="go build jaeger")
        tmp.replace(binary)
        _log(f"Jaeger built in {time.monotonic() - t0:.0f}s: {binary} "
             f"({binary.stat().st_size / 2**20:.1f} MiB)")
    return binary


def ensure_built(components: tuple[str, ...] = ("otelcol", "jaeger"),
                 *, force: bool = False) -> dict[str, Path]:
    """Build the missing binaries; return {"otelcol": Path, "jaeger": Path}."""
    v = pinned_versions()
    out: dict[str, Path] = {}
    if "otelcol" in components:
        out["otelcol"] = build_collector(v, force=force)
    if "jaeger" in components:
        out["jaeger"] = build_jaeger(v, force=force)
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


def write_local_collector_config(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    otlp_grpc_port: int,
    otlp_http_port: int,
    jaeger_otlp_grpc_endpoint: str,
    metrics_port: int,
    health_port: int,
    *,
    host: str = LOCALHOST,
    internal_metrics_port: int | None = None,
) -> Path:
    """Copy the project's collector config with only its endpoints rewritten for local ports.

    Everything else (processors, span_metrics settings, pipelines, comments) stays identical.
    One addition: the collector's own telemetry would listen on localhost:8888 by default,
    which collides between parallel runs; it is switched off (`service.telemetry.metrics.level:
    none`) unless internal_metrics_port is given, then it listens on host:internal_metrics_port.
    Raises ValueError if an expected endpoint is not found exactly once.
    """
    wanted = {
        ("receivers", "otlp", "protocols", "grpc"): f"{host}:{otlp_grpc_port}",
        ("receivers", "otlp", "protocols", "http"): f"{host}:{otlp_http_port}",
        ("exporters", "otlp*"): jaeger_otlp_grpc_endpoint,
        ("exporters", "prometheus"): f"{host}:{metrics_port}",
        ("extensions", "health_check"): f"{host}:{health_port}",
    }
    done: dict[tuple[str, ...], int] = dict.fromkeys(wanted, 0)
    stack: list[tuple[int, str]] = []
    out: list[str] = []
    service_line = None
    for line in Path(src).read_text(encoding="utf-8").splitlines(keepends=True):
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
        if parents == ("service",) and key == "telemetry" and internal_metrics_port is None:
            raise ValueError(f"{src}: has service.telemetry; pass internal_metrics_port")
        if key == "endpoint":
            for pat, new in wanted.items():
                if _path_matches(pat, parents):
                    comment = ""
                    if "#" in value:
                        comment = "  " + value[value.index("#"):]
                    line = f"{m.group(1)}endpoint:{sep or ' '}{new}{comment}\n"
                    done[pat] += 1
                    break
        out.append(line)
    bad = {"/".join(k): n for k, n in done.items() if n != 1}
    if bad:
        raise ValueError(f"{src}: endpoints not found exactly once: {bad}")
    if service_line is None:
        raise ValueError(f"{src}: no top-level service: section")
    if internal_metrics_port is None:
        telemetry = ["  telemetry:\n", "    metrics:\n", "      level: none\n"]
    else:
        telemetry = [
            "  telemetry:\n", "    metrics:\n", "      readers:\n", "        - pull:\n",
            "            exporter:\n", "              prometheus:\n",
            f"                host: {host}\n", f"                port: {internal_metrics_port}\n",
        ]
    out[service_line + 1:service_line + 1] = telemetry
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(out), encoding="utf-8")
    return dst


@dataclass(frozen=True)
class JaegerPorts:
    otlp_grpc: int
    otlp_http: int
    query_http: int  # UI and /api/v3/* (HTTP), /api/* (the UI's internal API)
    query_grpc: int  # api_v3 gRPC QueryService
    health: int


def write_jaeger_config(dst: str | os.PathLike[str], ports: JaegerPorts, *,
                        host: str = LOCALHOST, max_traces: int = 100_000) -> Path:
    """A Jaeger v2 config: in-memory storage, OTLP receiver, query API/UI, health check."""
    text = f"""\
# Jaeger v2 (cmd/jaeger) local config written by scripts/backends.py: memstore only.
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: info
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: {host}:{ports.health}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: {max_traces}
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: {host}:{ports.query_http}
    grpc:
      endpoint: {host}:{ports.query_grpc}
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: {host}:{ports.otlp_grpc}
      http:
        endpoint: {host}:{ports.otlp_http}
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text, encoding="utf-8")
    return dst


# --------------------------------------------------------------------------- processes


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def _start(argv: list[str], log_path: Path, health_url: str, timeout: float) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")
    _log(f"starting: {' '.join(argv)}  (log: {log_path})")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=log_path.parent)
    log.close()
    try:
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
                 binary: Path | None = None, timeout: float = 60.0) -> subprocess.Popen:
    """Start Jaeger v2 with in-memory storage on 127.0.0.1; returns once it is healthy."""
    workdir = Path(workdir)
    _check_free([ports.otlp_grpc, ports.otlp_http, ports.query_http, ports.query_grpc, ports.health])
    config = write_jaeger_config(workdir / "jaeger.yaml", ports)
    binary = binary or ensure_built(("jaeger",))["jaeger"]
    return _start([str(binary), f"--config={config}"], workdir / "jaeger.log",
                  f"http://{LOCALHOST}:{ports.health}/status", timeout)


def start_collector(config: str | os.PathLike[str], health_port: int, *,
                    other_ports: "tuple[int, ...] | list[int]" = (),
                    binary: Path | None = None, timeout: float = 60.0) -> subprocess.Popen:
    """Start the collector with a (local) config; returns once health_check answers.

    other_ports (OTLP, metrics) are checked to be free first, like health_port."""
    config = Path(config)
    _check_free([health_port, *other_ports])
    binary = binary or ensure_built(("otelcol",))["otelcol"]
    return _start([str(binary), f"--config={config}"], config.with_suffix(".log"),
                  f"http://{LOCALHOST}:{health_port}/", timeout)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def validate_collector_config(config: Path = COLLECTOR_CONFIG) -> None:
    binary = ensure_built(("otelcol",))["otelcol"]
    proc = subprocess.run([str(binary), "validate", f"--config={config}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise BackendError(f"collector rejects {config}:\n{proc.stdout}")


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
          f"({JAEGER_MODULE}@{v.jaeger_module})")
    for name, p in binary_paths(v).items():
        print(f"{name}\t{p}\t{'built' if p.is_file() else 'missing'}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    for name, p in ensure_built(tuple(args.only or ("otelcol", "jaeger")), force=args.force).items():
        print(f"{name}\t{p}")
    if not args.only:
        print(f"compose-schema\t{compose_schema()}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    validate_collector_config(Path(args.config))
    print(f"{args.config}: valid")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    paths = ensure_built()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="otel-stepspan-backends-"))
    jp = JaegerPorts(otlp_grpc=free_port(), otlp_http=free_port(), query_http=args.jaeger_ui_port,
                     query_grpc=free_port(), health=free_port())
    jaeger = start_jaeger(workdir, jp, binary=paths["jaeger"])
    try:
        cfg = write_local_collector_config(
            COLLECTOR_CONFIG, workdir / "collector.yaml", args.otlp_grpc_port, args.otlp_http_port,
            f"{LOCALHOST}:{jp.otlp_grpc}", args.metrics_port, args.health_port)
        collector = start_collector(
            cfg, args.health_port, binary=paths["otelcol"],
            other_ports=(args.otlp_grpc_port, args.otlp_http_port, args.metrics_port))
    except BaseException:
        stop(jaeger)
        raise
    print(f"OTLP gRPC  {LOCALHOST}:{args.otlp_grpc_port}\nOTLP HTTP  {LOCALHOST}:{args.otlp_http_port}\n"
          f"Jaeger     http://{LOCALHOST}:{jp.query_http}/api/v3/services\n"
          f"metrics    http://{LOCALHOST}:{args.metrics_port}/metrics\nlogs in    {workdir}",
          flush=True)
    try:
        while jaeger.poll() is None and collector.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stop(collector)
        stop(jaeger)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the missing binaries, print their paths")
    b.add_argument("--only", action="append", choices=["otelcol", "jaeger"])
    b.add_argument("--force", action="store_true", help="rebuild even if present")
    b.set_defaults(func=_cmd_build)
    sub.add_parser("paths", help="print binary paths, build nothing").set_defaults(func=_cmd_paths)
    va = sub.add_parser("validate", help="otelcol validate the collector config")
    va.add_argument("--config", default=str(COLLECTOR_CONFIG))
    va.set_defaults(func=_cmd_validate)
    r = sub.add_parser("run", help="run Jaeger (memstore) + collector on 127.0.0.1 until Ctrl-C")
    r.add_argument("--otlp-grpc-port", type=int, default=4317)
    r.add_argument("--otlp-http-port", type=int, default=4318)
    r.add_argument("--metrics-port", type=int, default=8889)
    r.add_argument("--health-port", type=int, default=13133)
    r.add_argument("--jaeger-ui-port", type=int, default=16686)
    r.add_argument("--workdir")
    r.set_defaults(func=_cmd_run)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
