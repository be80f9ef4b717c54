#!/usr/bin/env python3
"""Run the project's docker-compose.yml for real, on a machine that has no Docker yet.

What a new user would do, made repeatable (for CI, and for anyone without Docker Hub):

1. Docker Engine: Debian's `docker.io` package (installed with apt-get when `dockerd` is
   missing; root only), and `dockerd --iptables=false` started in the background when no
   daemon answers. Without iptables, ports published on 127.0.0.1 work through Docker's
   userland proxy, and containers reach each other on the compose network.
2. Docker Compose v2, built from its Go module (github.com/docker/compose/v2, pinned below)
   into the cache: `go install` refuses it (its go.mod has an exclude block), so it is built
   through a throw-away module (scripts/backends.py, build_go_program).
3. The images (Collector, Jaeger, Prometheus), tagged exactly as docker-compose.yml pins them,
   built FROM scratch out of the Go-built release binaries of scripts/backends.py (`docker
   import` of a file tree made here, no Dockerfile, no registry): the same entrypoint, user,
   environment and volume as the published images, and for Jaeger and Prometheus a static
   busybox (Debian's busybox-static) for the `wget` their health checks run. The registry images cannot be pulled here; these are the same
   releases, built from source. The search front's image (the project's own program,
   jaeger/search_front) is made the same way from its Go-built binary, under the tag
   docker-compose.yml names; `docker compose up` would otherwise build its Dockerfile.
4. The fleet's images (docker-compose.fleet.yml; docs/scale.md): the fleet Collector (agent
   and gateways) and Jaeger's es-index-cleaner (the OpenSearch indices' retention, with busybox
   for its daily loop, jaeger/index-cleaner.sh) made as in 3, from their Go-built binaries.
   Kafka and OpenSearch run on Java, so their images stand on a Debian made here:
   `debootstrap --variant=minbase` from the Debian mirror, imported as
   otel_stepspan/debian:bookworm; jre/Dockerfile adds Debian's OpenJDK 17
   (apt-get, with the host's network: dockerd runs without iptables, so a container's own
   network reaches nothing outside); kafka/Dockerfile and opensearch/Dockerfile add the jars
   scripts/backends.py fetched from Maven Central (`docker build`, the classic builder).

Everything goes to ${OTEL_STEPSPAN_BACKENDS_DIR:-~/.cache/otel_stepspan/backends}, outside git.

    python scripts/compose.py prepare          # all of the above, what is missing; prints the compose binary
    python scripts/compose.py compose ARGS...  # docker compose ARGS, in the repository root
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backends  # noqa: E402
from backends import BackendError, REPO_ROOT, backends_dir  # noqa: E402

COMPOSE_MODULE = "github.com/docker/compose/v2"
COMPOSE_VERSION = "v2.40.3"
BUSYBOX_PACKAGE = "busybox-static"
# The fleet's images (docker-compose.fleet.yml names the same tags; tests/test_compose_fleet.py
# checks it). The Debian under the Java runtime: its suite and the mirror debootstrap reads.
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("OTEL_STEPSPAN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_IMAGE = f"otel_stepspan/debian:{DEBIAN_SUITE}"
JRE_IMAGE = "otel_stepspan/jre:17"
KAFKA_IMAGE = f"otel_stepspan/kafka:{backends.KAFKA_VERSION}"
OPENSEARCH_IMAGE = f"otel_stepspan/opensearch:{backends.OPENSEARCH_VERSION}"
FLEET_COLLECTOR_IMAGE = "otel_stepspan/otelcol-fleet"  # tagged with the fleet Collector's release
INDEX_CLEANER_IMAGE = "otel_stepspan/es-index-cleaner"  # tagged with Jaeger's release
INDEX_CLEANER_SCRIPT = REPO_ROOT / "jaeger" / "index-cleaner.sh"


def _log(msg: str) -> None:
    print(f"[compose] {msg}", file=sys.stderr, flush=True)


def _docker() -> str:
    docker = shutil.which("docker")
    if not docker:
        raise BackendError("no docker command (the docker.io package installs one)")
    return docker


def _quiet(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def _daemon_answers() -> bool:
    try:
        return shutil.which("docker") is not None and _quiet([_docker(), "info"]).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BackendError(f"{' '.join(packages)} missing: install it (Debian: apt-get install "
                           f"{' '.join(packages)}) or run as root on Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        _log("apt-get install failed; updating the package lists once and trying again")
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)


def ensure_engine(timeout: float = 60.0) -> None:
    """A Docker daemon that answers: installed (docker.io) and started when missing."""
    if _daemon_answers():
        return
    t0 = time.monotonic()
    if not shutil.which("dockerd"):
        _log("installing Debian's docker.io (dockerd, containerd, runc)")
        _apt_install("docker.io")
    log = backends_dir() / "dockerd.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    _log(f"starting dockerd --iptables=false (log: {log})")
    with open(log, "ab") as out:
        subprocess.Popen(["dockerd", "--iptables=false"], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not _daemon_answers():
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise BackendError(f"dockerd did not answer within {timeout:.0f}s:\n{tail}")
        time.sleep(0.5)
    _log(f"Docker Engine ready in {time.monotonic() - t0:.0f}s")


def compose_binary() -> Path:
    return backends_dir() / f"compose-{COMPOSE_VERSION.lstrip('v')}" / "docker-compose"


def ensure_compose() -> Path:
    """Docker Compose v2 built from its Go module (a standalone `docker-compose` binary; the
    same program as the `docker compose` plugin)."""
    binary = compose_binary()
    return backends.built_once(binary, False, lambda: backends.build_go_program(
        COMPOSE_MODULE, COMPOSE_VERSION, COMPOSE_MODULE + "/cmd", binary,
        ldflags=f"-X {COMPOSE_MODULE}/internal.Version={COMPOSE_VERSION}",
        what=f"Docker Compose {COMPOSE_VERSION}"))


def busybox() -> Path:
    """A static busybox from Debian's busybox-static, unpacked into the cache (not installed)."""
    root = backends_dir() / "busybox-static"
    binary = root / "bin" / "busybox"
    if binary.is_file():
        return binary
    with tempfile.TemporaryDirectory(prefix="busybox-") as tmp:
        got = subprocess.run(["apt-get", "download", BUSYBOX_PACKAGE], cwd=tmp,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if got.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL, check=True)
            subprocess.run(["apt-get", "download", BUSYBOX_PACKAGE], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
        deb = next(Path(tmp).glob(f"{BUSYBOX_PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    if not binary.is_file():
        raise BackendError(f"{BUSYBOX_PACKAGE} has no bin/busybox")
    return binary


# --------------------------------------------------------------------------- images

class Image:
    """A file tree and the image settings of one published image, rebuilt here."""

    def __init__(self, tag: str, files: dict[str, Path], *, entrypoint: list[str],
                 cmd: list[str] | None = None, user: str, env: dict[str, str] | None = None,
                 volume: str | None = None, links: dict[str, str] | None = None,
                 dirs: dict[str, int] | None = None) -> None:
        self.tag, self.files, self.links, self.dirs = tag, files, links or {}, dirs or {}
        self.changes = [f"ENTRYPOINT {json.dumps(entrypoint)}", f"USER {user}"]
        if cmd:
            self.changes.append(f"CMD {json.dumps(cmd)}")
        self.changes += [f"ENV {k}={v}" for k, v in (env or {}).items()]
        if volume:
            self.changes.append(f"VOLUME {json.dumps([volume])}")

    def digest(self) -> str:
        """What the image is made of: the recipe and every file's content."""
        h = hashlib.sha256(repr((self.changes, sorted(self.links.items()),
                                 sorted(self.dirs.items()), sorted(self.files))).encode())
        for name in sorted(self.files):
            h.update(self.files[name].read_bytes())
        return h.hexdigest()[:24]

    def rootfs(self) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, mode in sorted(self.dirs.items()):
                info = tarfile.TarInfo(name.lstrip("/"))
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            for name, src in sorted(self.files.items()):
                info = tar.gettarinfo(str(src), arcname=name.lstrip("/"))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if os.access(src, os.X_OK) else 0o644
                with open(src, "rb") as fh:
                    tar.addfile(info, fh)
            for name, target in sorted(self.links.items()):
                info = tarfile.TarInfo(name.lstrip("/"))
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
        return buf.getvalue()

    def ensure(self) -> str:
        """Import the image unless the tag already holds this exact build; returns its id."""
        digest = self.digest()
        docker = _docker()
        seen = _quiet([docker, "image", "inspect", "--format", "{{.Comment}} {{.Id}}", self.tag])
        if seen.returncode == 0 and seen.stdout.split()[0] == f"otel_stepspan:{digest}":
            return seen.stdout.split()[1]
        argv = [docker, "import", "--message", f"otel_stepspan:{digest}"]
        for change in self.changes:
            argv += ["--change", change]
        proc = subprocess.run([*argv, "-", self.tag], input=self.rootfs(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        if proc.returncode != 0:
            raise BackendError(f"docker import {self.tag} failed: {proc.stderr.decode()}")
        _log(f"built {self.tag} ({proc.stdout.decode().strip()[:19]})")
        return proc.stdout.decode().strip()


def images() -> list[Image]:
    """The images docker-compose.yml pins, as the published ones are laid out: Jaeger's binary
    at /cmd/jaeger/jaeger-linux, user 10001, JAEGER_LISTEN_HOST=0.0.0.0, /tmp as its volume;
    the collector's at /otelcol-contrib, user 10001, its config in /etc/otelcol-contrib;
    Prometheus's at /bin/prometheus, user nobody (65534), /prometheus (its data) as its volume,
    writable by that user (mode 1777, as Jaeger's /tmp), busybox for its health check's wget;
    the search front's (this repository's program) at /search-front, user 10001, no shell: its
    health check is its own -probe."""
    v = backends.pinned_versions()
    paths = backends.binary_paths(v)
    box = busybox()
    jaeger = Image(
        f"{backends.JAEGER_IMAGE}:{v.jaeger}",
        {"/cmd/jaeger/jaeger-linux": paths["jaeger"], "/bin/busybox": box},
        links={"/bin/wget": "busybox", "/bin/sh": "busybox"},
        dirs={"/tmp": 0o1777, "/bin": 0o755, "/cmd": 0o755, "/cmd/jaeger": 0o755},
        entrypoint=["/cmd/jaeger/jaeger-linux"], user="10001",
        env={"JAEGER_LISTEN_HOST": "0.0.0.0"}, volume="/tmp")
    collector = Image(
        f"{backends.COLLECTOR_IMAGE}:{v.collector}",
        {"/otelcol-contrib": paths["otelcol"],
         "/etc/otelcol-contrib/config.yaml": backends.COLLECTOR_CONFIG},
        dirs={"/etc": 0o755, "/etc/otelcol-contrib": 0o755},
        entrypoint=["/otelcol-contrib"], cmd=["--config", "/etc/otelcol-contrib/config.yaml"],
        user="10001:10001")
    prometheus = Image(
        f"{backends.PROMETHEUS_IMAGE}:v{v.prometheus}",
        {"/bin/prometheus": paths["prometheus"], "/bin/busybox": box,
         "/etc/prometheus/prometheus.yml": backends.PROMETHEUS_CONFIG},
        links={"/bin/wget": "busybox"},
        dirs={"/bin": 0o755, "/etc": 0o755, "/etc/prometheus": 0o755, "/prometheus": 0o1777},
        entrypoint=["/bin/prometheus"],
        cmd=["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
        user="65534", volume="/prometheus")
    # The project's own program: the same layout as jaeger/search_front/Dockerfile builds.
    search_front = Image(
        backends.SEARCH_FRONT_IMAGE, {"/search-front": paths["search_front"]},
        entrypoint=["/search-front"], user="10001")
    return [jaeger, collector, prometheus, search_front]


def fleet_collector_image() -> Image:
    """The fleet Collector (agent and gateways: collector/gateway-builder-config.yaml) laid out
    as the single-node one, with busybox for the health checks' wget: docker-compose.fleet.yml's
    `--wait` waits for each health_check to answer."""
    box = busybox()
    return Image(
        f"{FLEET_COLLECTOR_IMAGE}:{backends.gateway_version()}",
        {"/otelcol": backends.gateway_binary_path(), "/bin/busybox": box,
         "/etc/otelcol/agent.yaml": backends.AGENT_CONFIG},
        links={"/bin/wget": "busybox"},
        # The queue's folder writable by the image's user (mode 1777, as Prometheus's data): a
        # fresh named volume mounted there takes that mode, so the collector need not be root.
        dirs={"/bin": 0o755, "/etc": 0o755, "/etc/otelcol": 0o755, "/var": 0o755, "/var/lib": 0o755,
              "/var/lib/otelcol": 0o755, backends.COLLECTOR_QUEUE_PATH: 0o1777},
        entrypoint=["/otelcol"], cmd=["--config=/etc/otelcol/agent.yaml"], user="10001:10001")


def index_cleaner_image() -> Image:
    """Jaeger's es-index-cleaner (the retention of the fleet's OpenSearch indices: docs/scale.md)
    where the published image jaegertracing/jaeger-es-index-cleaner has it, user 10001, with
    busybox for the shell and tools of jaeger/index-cleaner.sh, its entrypoint: the cleaner at
    start and daily at 00:05 UTC. The bare cleaner runs with --entrypoint
    /go/bin/es-index-cleaner-linux."""
    box = busybox()
    v = backends.pinned_versions()
    return Image(
        f"{INDEX_CLEANER_IMAGE}:{v.jaeger}",
        {"/go/bin/es-index-cleaner-linux": backends.binary_paths(v)["es_index_cleaner"], "/bin/busybox": box,
         "/index-cleaner.sh": INDEX_CLEANER_SCRIPT},
        links={f"/bin/{applet}": "busybox"
               for applet in ("sh", "date", "sleep", "tr", "grep", "sed", "sort", "cat", "tail")},
        # /tmp: where the script keeps a run's output to read the deleted indices from it.
        dirs={"/bin": 0o755, "/go": 0o755, "/go/bin": 0o755, "/tmp": 0o1777},
        entrypoint=["/bin/sh", "/index-cleaner.sh"], user="10001")


def debian_image() -> str:
    """DEBIAN_IMAGE, made once: a minimal Debian (debootstrap --variant=minbase, from
    DEBIAN_MIRROR), with the suite's updates and security archives in its sources, imported as
    one layer. A few minutes the first time; an image that exists is kept as it is (delete the
    tag to make it again, with the packages of that day)."""
    docker = _docker()
    seen = _quiet([docker, "image", "inspect", "--format", "{{.Id}}", DEBIAN_IMAGE])
    if seen.returncode == 0:
        return seen.stdout.strip()
    if not shutil.which("debootstrap"):
        _apt_install("debootstrap")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=backends_dir()) as tmp:
        root = Path(tmp) / "rootfs"
        _log(f"debootstrap --variant=minbase {DEBIAN_SUITE} from {DEBIAN_MIRROR} (the Java images' base)")
        got = subprocess.run(["nice", "-n", "10", "debootstrap", "--variant=minbase", DEBIAN_SUITE, str(root),
                              DEBIAN_MIRROR], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if got.returncode != 0:
            raise BackendError(f"debootstrap failed ({got.returncode}):\n{got.stdout[-4000:]}")
        # The packages debootstrap downloaded and the package lists: the image needs neither.
        for leftover in [*(root / "var" / "cache" / "apt" / "archives").glob("*.deb"),
                         *(p for p in (root / "var" / "lib" / "apt" / "lists").iterdir() if p.is_file())]:
            leftover.unlink()
        security = DEBIAN_MIRROR.rstrip("/") + "-security"
        (root / "etc" / "apt" / "sources.list").write_text(
            f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\ndeb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main\n"
            f"deb {security} {DEBIAN_SUITE}-security main\n", encoding="utf-8")
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([docker, "import", "--message", f"debootstrap {DEBIAN_SUITE} {DEBIAN_MIRROR}",
                                   "-", DEBIAN_IMAGE], stdin=tar.stdout, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        tar.stdout.close()
        if tar.wait() != 0 or imported.returncode != 0:
            raise BackendError(f"docker import {DEBIAN_IMAGE} failed: {imported.stderr}")
    _log(f"built {DEBIAN_IMAGE} in {time.monotonic() - t0:.0f}s")
    return imported.stdout.strip()


class BuiltImage:
    """An image built from one of the repository's Dockerfiles by `docker build` (the classic
    builder: no BuildKit, no registry), with a context put together from ``files`` (name in the
    context: a file, or a folder taken whole), hard-linked into a folder beside the cache."""

    def __init__(self, tag: str, dockerfile: Path, files: dict[str, Path], *, parent: str,
                 build_args: dict[str, str] | None = None, host_network: bool = False) -> None:
        self.tag, self.dockerfile, self.files, self.parent = tag, dockerfile, files, parent
        self.build_args = {"BASE": parent, **(build_args or {})}
        self.host_network = host_network

    def _context_files(self) -> list[tuple[str, Path]]:
        out = []
        for name, src in sorted(self.files.items()):
            if src.is_dir():
                out += [(f"{name}/{f.relative_to(src)}", f) for f in sorted(src.rglob("*")) if f.is_file()]
            else:
                out.append((name, src))
        return out

    def digest(self, parent_id: str) -> str:
        """What the image is made of: its parent, build args, the Dockerfile, and every file's
        name, mode and content."""
        h = hashlib.sha256(repr((parent_id, sorted(self.build_args.items()))).encode() + self.dockerfile.read_bytes())
        for name, src in self._context_files():
            h.update(f"\n{name} {os.access(src, os.X_OK)}\n".encode())
            with open(src, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()[:24]

    def ensure(self, parent_id: str) -> str:
        """Build unless the tag already holds this exact build; returns the image's id."""
        docker = _docker()
        digest = self.digest(parent_id)
        seen = _quiet([docker, "image", "inspect", "--format",
                       '{{index .Config.Labels "otel_stepspan.digest"}} {{.Id}}', self.tag])
        if seen.returncode == 0 and seen.stdout.split()[0] == digest:
            return seen.stdout.split()[1]
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="image-context-", dir=backends_dir()) as tmp:
            for name, src in self._context_files():
                dst = Path(tmp) / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:  # another filesystem (the repository's own files)
                    shutil.copy2(src, dst)
            argv = [docker, "build", "-q", "-f", str(self.dockerfile),
                    *(f"--build-arg={k}={v}" for k, v in sorted(self.build_args.items())),
                    "--label", f"otel_stepspan.digest={digest}", "-t", self.tag, tmp]
            if self.host_network:
                argv[2:2] = ["--network", "host"]
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "DOCKER_BUILDKIT": "0"})
        if proc.returncode != 0:
            raise BackendError(f"docker build {self.tag} failed:\n{proc.stdout[-4000:]}")
        _log(f"built {self.tag} in {time.monotonic() - t0:.0f}s")
        return _quiet([docker, "image", "inspect", "--format", "{{.Id}}", self.tag]).stdout.strip()


def java_images() -> list[BuiltImage]:
    """The Java runtime (jre/Dockerfile), then Kafka and OpenSearch on it, each FROM the one
    before it in this list's first entry (their build arg BASE)."""
    home = backends.opensearch_home()
    jre = BuiltImage(JRE_IMAGE, REPO_ROOT / "jre" / "Dockerfile", {}, parent=DEBIAN_IMAGE, host_network=True)
    kafka = BuiltImage(KAFKA_IMAGE, REPO_ROOT / "kafka" / "Dockerfile",
                       {"libs": backends.kafka_libs_dir(), "entrypoint.sh": REPO_ROOT / "kafka" / "entrypoint.sh"},
                       parent=JRE_IMAGE, build_args={"JVM_OPTIONS": " ".join(backends.KAFKA_JVM_OPTIONS)})
    opensearch = BuiltImage(OPENSEARCH_IMAGE, REPO_ROOT / "opensearch" / "Dockerfile",
                            {"home": home, "entrypoint.sh": REPO_ROOT / "opensearch" / "entrypoint.sh"},
                            parent=JRE_IMAGE, build_args={"JVM_OPTIONS": " ".join(backends.OPENSEARCH_JVM_OPTIONS)})
    return [jre, kafka, opensearch]


def prepare_fleet() -> None:
    """The fleet's images (docker-compose.fleet.yml), each only when missing or out of date:
    the fleet Collector's, and the Java runtime with Kafka and OpenSearch on it (their jars
    fetched with Maven when missing), and Jaeger's index cleaner's."""
    backends.ensure_built(("otelcol_gateway", "es_index_cleaner", "kafka", "opensearch"))
    fleet_collector_image().ensure()
    index_cleaner_image().ensure()
    jre, *on_jre = java_images()
    jre_id = jre.ensure(debian_image())
    for image in on_jre:
        image.ensure(jre_id)


def prepare(fleet: bool = True) -> Path:
    """Engine, compose and images (with ``fleet``, the fleet's too), each only when missing;
    returns the compose binary."""
    t0 = time.monotonic()
    ensure_engine()
    backends.ensure_built()
    binary = ensure_compose()
    for image in images():
        image.ensure()
    if fleet:
        prepare_fleet()
    _log(f"ready in {time.monotonic() - t0:.0f}s: {binary}")
    return binary


def compose(*args: str, timeout: float = 300, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`docker compose ARGS` in the repository root (the project's compose file)."""
    argv = [str(compose_binary()), "--project-directory", str(REPO_ROOT), *args]
    proc = subprocess.run(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise BackendError(f"docker compose {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="install/start Docker, build compose and the images (what is missing)")
    p.add_argument("--no-fleet", action="store_true",
                   help="leave out the fleet's images (docker-compose.fleet.yml: Java, Kafka, OpenSearch)")
    c = sub.add_parser("compose", help="docker compose ARGS in the repository root")
    c.add_argument("args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "prepare":
            print(prepare(fleet=not args.no_fleet))
            return 0
        os.execv(str(compose_binary()), [str(compose_binary()), *args.args])
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
