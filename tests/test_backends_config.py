"""The local copies of the project's backend configs, and the images' file trees, without Go or
Docker: a local run must use the very configs docker-compose.yml mounts, with only endpoints and
data directories changed, and the rebuilt images must be laid out as the published ones."""

from __future__ import annotations

import difflib
import io
import socket
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import backends  # noqa: E402
import compose  # noqa: E402


def _changed(original: Path, local: Path) -> list[tuple[str, str]]:
    """(old line, new line) for each line that differs."""
    a, b = original.read_text().splitlines(), local.read_text().splitlines()
    pairs = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b).get_opcodes():
        if tag == "replace":
            pairs += list(zip(a[i1:i2], b[j1:j2]))
        elif tag != "equal":
            pairs += [(line, "") for line in a[i1:i2]] + [("", line) for line in b[j1:j2]]
    return pairs


def test_local_collector_config_changes_only_endpoints_queue_dir_and_own_telemetry(tmp_path):
    local = backends.write_local_collector_config(
        backends.COLLECTOR_CONFIG, tmp_path / "c.yaml", 1001, 1002, "127.0.0.1:1003", 1004, 1005,
        queue_dir=tmp_path / "queue")
    changed = _changed(backends.COLLECTOR_CONFIG, local)
    added = [new for old, new in changed if not old]
    replaced = [(old, new) for old, new in changed if old and new]
    assert added == ["  telemetry:", "    metrics:", "      level: none"]
    assert all(("endpoint:" in old and "endpoint:" in new) or backends.COLLECTOR_QUEUE_PATH in old
               for old, new in replaced), replaced
    config = yaml.safe_load(local.read_text())
    assert config["service"]["pipelines"]["traces"]["processors"][0] == "memory_limiter"
    assert config["extensions"]["file_storage/queue"]["directory"] == str(tmp_path / "queue")
    assert config["exporters"]["otlp_grpc/jaeger"]["sending_queue"]["storage"] == "file_storage/queue"
    assert config["exporters"]["otlp_grpc/jaeger"]["endpoint"] == "127.0.0.1:1003"
    assert "batch" not in config["processors"]  # it would acknowledge before the queue holds the spans


def test_local_secured_overlay_reads_the_given_secrets(tmp_path):
    local = backends.write_local_secured_config(tmp_path / "s.yaml", tmp_path / "secrets")
    config = yaml.safe_load(local.read_text())
    grpc = config["receivers"]["otlp"]["protocols"]["grpc"]
    assert grpc["tls"]["cert_file"] == str((tmp_path / "secrets" / "server.crt").resolve())
    assert grpc["auth"]["authenticator"] in config["extensions"]
    assert config["extensions"][grpc["auth"]["authenticator"]]["filename"].startswith(str(tmp_path))
    assert all(len(new) for old, new in _changed(backends.SECURED_CONFIG, local))


def test_local_jaeger_config_keeps_badger_and_moves_only_endpoints_and_directories(tmp_path):
    ports = backends.JaegerPorts(2001, 2002, 2003, 2004, 2005)
    local = backends.write_jaeger_config(tmp_path / "j.yaml", ports, data_dir=tmp_path / "data")
    config = yaml.safe_load(local.read_text())
    badger = config["extensions"]["jaeger_storage"]["backends"]["steps"]["badger"]
    assert badger["ephemeral"] is False
    assert badger["directories"]["keys"].startswith(str((tmp_path / "data").resolve()))
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "127.0.0.1:2001"
    assert config["extensions"]["jaeger_query"]["http"]["endpoint"] == "127.0.0.1:2003"
    assert "processors" not in config["service"]["pipelines"]["traces"]  # stored before acknowledged
    for old, new in _changed(backends.JAEGER_CONFIG, local):
        assert "endpoint:" in old or backends.JAEGER_DATA_PATH in old, (old, new)


def test_free_ports_are_distinct():
    ports = backends.free_ports(50)
    assert len(set(ports)) == 50


def test_free_ports_are_ones_the_kernel_never_gives_to_outgoing_connections():
    # A port from the ephemeral range can be taken by any client's connect() before the server
    # that was meant to have it binds it (a collector started 20 s after its engine lost it so).
    low, high = backends.ephemeral_range()
    assert low < high
    ports = backends.free_ports(20)
    assert all(1024 <= p < low for p in ports), (ports, low)
    with socket.socket() as s:  # and a picked port is really free
        s.bind((backends.LOCALHOST, ports[0]))


def test_free_ports_never_pick_a_port_given_by_number(monkeypatch):
    # `run --fleet --otlp-grpc-port P` picks its gateways' ports before its agent binds P.
    low, _ = backends.ephemeral_range()
    monkeypatch.setattr(backends, "_handed_out", set())
    backends.reserve_ports({str(port): port for port in range(backends._PICKED_FROM, low, 2)})
    backends.reserve_ports({"metrics": None})
    picked = backends.free_ports(200)
    assert all((port - backends._PICKED_FROM) % 2 == 1 for port in picked), picked


def test_rebuilt_jaeger_image_is_laid_out_like_the_published_one(tmp_path):
    binary, box = tmp_path / "jaeger", tmp_path / "busybox"
    binary.write_bytes(b"\x7fELF jaeger")
    box.write_bytes(b"\x7fELF busybox")
    binary.chmod(0o755)
    box.chmod(0o755)
    image = compose.Image(
        "jaegertracing/jaeger:test", {"/cmd/jaeger/jaeger-linux": binary, "/bin/busybox": box},
        links={"/bin/wget": "busybox"}, dirs={"/tmp": 0o1777}, entrypoint=["/cmd/jaeger/jaeger-linux"],
        user="10001", env={"JAEGER_LISTEN_HOST": "0.0.0.0"}, volume="/tmp")
    with tarfile.open(fileobj=io.BytesIO(image.rootfs())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777  # writable by user 10001
    assert members["cmd/jaeger/jaeger-linux"].mode == 0o755
    assert members["bin/wget"].issym() and members["bin/wget"].linkname == "busybox"
    assert 'ENTRYPOINT ["/cmd/jaeger/jaeger-linux"]' in image.changes
    assert "USER 10001" in image.changes and 'VOLUME ["/tmp"]' in image.changes
    before = image.digest()
    binary.write_bytes(b"\x7fELF jaeger, rebuilt")
    assert image.digest() != before  # a new binary makes a new image


def test_compose_file_and_builder_config_pin_one_collector_release():
    versions = backends.pinned_versions()  # raises when builder-config.yaml disagrees
    builder = yaml.safe_load(backends.BUILDER_CONFIG.read_text())
    assert builder["dist"]["version"] == versions.collector
    modules = [m["gomod"] for kind in ("receivers", "processors", "exporters", "connectors", "extensions")
               for m in builder[kind]]
    assert {m.split()[1] for m in modules} == {f"v{versions.collector}"}


def test_local_prometheus_config_changes_only_the_scrape_target(tmp_path):
    local = backends.write_prometheus_config(tmp_path / "p.yml", "127.0.0.1:3001")
    assert _changed(backends.PROMETHEUS_CONFIG, local) == [
        ('      - targets: ["otel-collector:8889"]', '      - targets: ["127.0.0.1:3001"]')]
    job, = yaml.safe_load(local.read_text())["scrape_configs"]
    # what names the Monitor tab's rows: span_name from forward_mode, on the connector's series
    rules = {r["replacement"]: r for r in job["metric_relabel_configs"]}
    assert set(rules) == {"step[$1]", "(not a step)"}
    assert all(r["target_label"] == "span_name" for r in rules.values())


def test_fleet_prometheus_config_scrapes_every_gateway_as_the_single_one_scrapes_the_collector(tmp_path):
    """prometheus/prometheus-fleet.yml: one job over every gateway's span metrics, with the
    interval and the relabelling of prometheus/prometheus.yml (the Monitor tab reads both alike);
    `run --fleet` rewrites its targets and nothing else."""
    single, fleet = (yaml.safe_load(f.read_text()) for f in (backends.PROMETHEUS_CONFIG, backends.PROMETHEUS_FLEET_CONFIG))
    assert fleet["global"] == single["global"]
    job, = fleet["scrape_configs"]
    assert job["metric_relabel_configs"] == single["scrape_configs"][0]["metric_relabel_configs"]
    # the services the agent's resolver finds under its DNS name, each on its metrics port
    resolver = yaml.safe_load(backends.AGENT_CONFIG.read_text())["exporters"]["load_balancing"]["resolver"]
    gateways = sorted(name for name, service in _fleet_compose_services().items()
                      if resolver["dns"]["hostname"] in service.get("networks", {}).get("default", {}).get("aliases", []))
    assert gateways == ["gateway-1", "gateway-2"]
    assert job["static_configs"] == [{"targets": [f"{g}:8889" for g in gateways]}]
    targets = ["127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003"]
    local = backends.write_prometheus_config(tmp_path / "p.yml", targets, src=backends.PROMETHEUS_FLEET_CONFIG)
    (old, new), = _changed(backends.PROMETHEUS_FLEET_CONFIG, local)
    assert yaml.safe_load(new.strip()[2:]) == {"targets": targets}
    with pytest.raises(ValueError, match="target"):
        backends.write_prometheus_config(tmp_path / "q.yml", [], src=backends.PROMETHEUS_FLEET_CONFIG)


def test_jaeger_queries_the_prometheus_that_compose_and_run_start(tmp_path):
    compose_file = yaml.safe_load((backends.REPO_ROOT / "docker-compose.yml").read_text())
    assert f"prom/prometheus:v{backends.pinned_versions().prometheus}" == compose_file["services"]["prometheus"]["image"]
    assert "profiles" not in compose_file["services"]["prometheus"]  # started by a plain `up`
    config = yaml.safe_load(backends.JAEGER_CONFIG.read_text())
    name = config["extensions"]["jaeger_query"]["storage"]["metrics"]
    prometheus = config["extensions"]["jaeger_storage"]["metric_backends"][name]["prometheus"]
    assert prometheus["endpoint"] == "http://prometheus:9090"
    assert config["extensions"]["jaeger_query"]["enable_tracing"] is False
    local = backends.write_jaeger_config(tmp_path / "j.yaml", backends.JaegerPorts(1, 2, 3, 4, 5),
                                         data_dir=tmp_path, prometheus_url="http://127.0.0.1:3002")
    local_config = yaml.safe_load(local.read_text())
    assert local_config["extensions"]["jaeger_storage"]["metric_backends"][name]["prometheus"] == {
        **prometheus, "endpoint": "http://127.0.0.1:3002"}


def test_prometheus_release_maps_to_its_go_module_version():
    versions = backends.Versions(collector="0.165.0", jaeger="2.13.0", prometheus="3.16.0")
    assert versions.prometheus_module == "v0.316.0"
    assert backends.Versions("0.165.0", "2.13.0", "3.5.1").prometheus_module == "v0.305.1"


def test_a_built_jaeger_ui_is_served_when_given_and_a_wrong_directory_is_refused(tmp_path):
    """`backends.py run --ui-assets DIR`: Jaeger's query extension serves DIR instead of the
    placeholder page a Jaeger built from its Go module has."""
    assets = tmp_path / "build"
    assets.mkdir()
    (assets / "index.html").write_text("<html></html>")
    ports = backends.JaegerPorts(1, 2, 3, 4, 5)
    local = backends.write_jaeger_config(tmp_path / "j.yaml", ports, data_dir=tmp_path / "data", ui_assets=assets)
    query = yaml.safe_load(local.read_text())["extensions"]["jaeger_query"]
    assert query["ui"] == {"assets_path": str(assets.resolve())}
    assert query["http"] == {"endpoint": "127.0.0.1:3"}
    plain = yaml.safe_load(backends.write_jaeger_config(tmp_path / "p.yaml", ports, data_dir=tmp_path).read_text())
    assert "ui" not in plain["extensions"]["jaeger_query"]
    with pytest.raises(backends.BackendError, match="no index.html"):
        backends.write_jaeger_config(tmp_path / "x.yaml", ports, data_dir=tmp_path, ui_assets=tmp_path / "data")


def test_local_agent_config_changes_only_endpoints_gateways_queue_dir_and_own_telemetry(tmp_path):
    gateways = ["127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003"]
    local = backends.write_local_agent_config(backends.AGENT_CONFIG, tmp_path / "a.yaml", 1001, 1002, gateways, 1005,
                                              queue_dir=tmp_path / "queue")
    changed = _changed(backends.AGENT_CONFIG, local)
    assert [new for old, new in changed if not old][-3:] == ["  telemetry:", "    metrics:", "      level: none"]
    resolver = [(old, new) for old, new in changed[:-3] if "endpoint:" not in old + new
                and backends.COLLECTOR_QUEUE_PATH not in old]
    for old, new in changed[:-3]:  # endpoints, the queue directory, the resolver
        assert ("endpoint:" in old and "endpoint:" in new) or backends.COLLECTOR_QUEUE_PATH in old or (
            (old, new) in resolver), (old, new)
    # the dns resolver's five lines become a static list of the local gateways
    assert [old.strip() for old, _ in resolver if old] == [
        "dns:", "hostname: gateways", "port: \"4317\"  # a string: the resolver refuses a number", "interval: 1s", "timeout: 1s"]
    assert [new.strip() for _, new in resolver if new] == [
        "static:", "hostnames:", *(f"- {g}" for g in gateways)]
    config = yaml.safe_load(local.read_text())
    balancer = config["exporters"]["load_balancing"]
    assert balancer["routing_key"] == "traceID"
    assert balancer["resolver"] == {"static": {"hostnames": gateways}}
    assert balancer["sending_queue"]["storage"] == "file_storage/queue"
    assert config["extensions"]["file_storage/queue"]["directory"] == str(tmp_path / "queue")
    assert config["service"]["pipelines"]["traces"]["processors"] == ["memory_limiter"]
    with pytest.raises(ValueError, match="gateway"):
        backends.write_local_agent_config(backends.AGENT_CONFIG, tmp_path / "b.yaml", 1, 2, [], 3,
                                          queue_dir=tmp_path / "queue")


def _own_metrics_port(config_path: Path) -> int | None:
    """The port a local Collector config serves the Collector's own metrics on; None when off."""
    metrics = yaml.safe_load(config_path.read_text())["service"]["telemetry"]["metrics"]
    if metrics.get("level") == "none":
        return None
    return metrics["readers"][0]["pull"]["exporter"]["prometheus"]["port"]


def test_fleet_serves_its_collectors_own_metrics_only_when_asked(tmp_path):
    """benchmarks/bench_fleet.py reads the agent's and the gateways' refused counters there; `run`
    and the tests leave them off (the default port would collide between Collectors)."""
    binaries = {name: tmp_path / name for name in ("jaeger", "prometheus", "search_front", "otelcol_gateway")}
    plain = backends.LocalFleet(tmp_path / "plain", binaries=binaries)
    assert plain.own_metrics_urls == {}
    assert [_own_metrics_port(config) for config, _, _ in plain.gateway_configs] == [None, None]
    assert _own_metrics_port(plain.config) is None
    fleet = backends.LocalFleet(tmp_path / "own", gateways=3, own_metrics=True, binaries=binaries)
    assert list(fleet.own_metrics_urls) == ["gateway-1", "gateway-2", "gateway-3", "agent"]
    ports = [_own_metrics_port(config) for config, _, _ in fleet.gateway_configs] + [_own_metrics_port(fleet.config)]
    assert [f"http://127.0.0.1:{port}/metrics" for port in ports] == list(fleet.own_metrics_urls.values())
    assert len(set(ports)) == 4
    for (_, _, others), port in zip(fleet.gateway_configs, ports):  # checked free before each start
        assert port in others


def test_gateway_counts_every_span_before_sampling_and_names_metrics_as_the_collector_does(tmp_path):
    gateway = yaml.safe_load(backends.GATEWAY_CONFIG.read_text())
    pipelines = gateway["service"]["pipelines"]
    intake, = [p for p in pipelines.values() if "otlp" in p.get("receivers", [])]
    assert intake["processors"] == ["memory_limiter"] and "span_metrics" in intake["exporters"]
    sampled, = [p for p in pipelines.values() if "tail_sampling" in p.get("processors", [])]
    assert sampled["receivers"] == ["forward"] and "forward" in intake["exporters"]
    # the same span metrics as the single collector: Prometheus and Jaeger's Monitor tab read both
    collector = yaml.safe_load(backends.COLLECTOR_CONFIG.read_text())
    assert gateway["connectors"]["span_metrics"] == collector["connectors"]["span_metrics"]
    local = backends.write_local_collector_config(
        backends.GATEWAY_CONFIG, tmp_path / "g.yaml", 1001, 1002, "127.0.0.1:1003", 1004, 1005,
        queue_dir=tmp_path / "queue")
    replaced = [(old, new) for old, new in _changed(backends.GATEWAY_CONFIG, local) if old and new]
    assert all("endpoint:" in old or backends.COLLECTOR_QUEUE_PATH in old for old, new in replaced), replaced
    policies = yaml.safe_load(local.read_text())["processors"]["tail_sampling"]["policies"]
    assert policies == gateway["processors"]["tail_sampling"]["policies"]


def test_fleet_builder_config_pins_one_release(tmp_path):
    version = backends.gateway_version()
    builder = yaml.safe_load(backends.GATEWAY_BUILDER_CONFIG.read_text())
    assert builder["dist"]["version"] == version
    modules = [m["gomod"] for kind in ("receivers", "processors", "exporters", "connectors", "extensions")
               for m in builder[kind]]
    assert {m.split()[1] for m in modules} == {f"v{version}"}
    assert any("loadbalancingexporter" in m for m in modules) and any("tailsamplingprocessor" in m for m in modules)
    assert backends.binary_paths()["otelcol_gateway"].parent.parent.name == f"otelcol-gateway-{version}"
    other = tmp_path / "manifest.yaml"
    other.write_text(backends.GATEWAY_BUILDER_CONFIG.read_text().replace(
        f"tailsamplingprocessor v{version}", "tailsamplingprocessor v0.160.0"))
    with pytest.raises(backends.BackendError, match="tailsamplingprocessor v0.160.0"):
        backends.gateway_version(other)


class _ComposeLoader(yaml.SafeLoader):
    """A safe loader that reads compose's merge tags (!override, !reset) as plain values."""


_ComposeLoader.add_multi_constructor("!", lambda loader, tag, node: (
    loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else
    loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node)))


def _fleet_compose_services() -> dict:
    """docker-compose.fleet.yml's services, with its anchors merged in."""
    text = (backends.REPO_ROOT / "docker-compose.fleet.yml").read_text()
    return yaml.load(text, Loader=_ComposeLoader)["services"]  # noqa: S506 (a safe loader)


def test_opensearch_nodes_are_three_voters_two_of_which_hold_data(tmp_path):
    """Any one node lost, two voters of three are left to elect a manager (docs/scale.md); the
    compose file's nodes are set the same way."""
    nodes = [backends.OpenSearchNode("os1", 9200, 9300), backends.OpenSearchNode("os2", 9201, 9301),
             backends.OpenSearchNode("os3", 9202, 9302, holds_data=False)]
    settings = {}
    for node in nodes:
        path = backends.write_opensearch_config(tmp_path / node.name, node, nodes, data_dir=tmp_path / "d",
                                                logs_dir=tmp_path / "l")
        settings[node.name] = yaml.safe_load(path.read_text())
    assert {name: s["node.roles"] for name, s in settings.items()} == {
        "os1": ["cluster_manager", "data", "ingest"], "os2": ["cluster_manager", "data", "ingest"],
        "os3": ["cluster_manager"]}
    assert all(s["cluster.initial_cluster_manager_nodes"] == ["os1"] for s in settings.values())
    assert all(s["discovery.seed_hosts"] == ["127.0.0.1:9300", "127.0.0.1:9301", "127.0.0.1:9302"]
               for s in settings.values())
    services = _fleet_compose_services()
    compose_roles = {}
    for service in ("opensearch-1", "opensearch-2", "opensearch-3"):
        flags = dict(arg[2:].split("=", 1) for arg in services[service]["command"])
        compose_roles[flags["node.name"]] = flags["node.roles"].split(",")
        assert flags["cluster.initial_cluster_manager_nodes"] == "os1"
    assert compose_roles == {name: s["node.roles"] for name, s in settings.items()}


def test_a_machine_that_refuses_user_namespaces_is_named_before_a_node_starts(tmp_path, monkeypatch):
    """As root, OpenSearch nodes start under `unshare --user`; where the machine forbids that
    (a container's seccomp profile), the error says so and what to do, not a node's log tail."""
    refusing = tmp_path / "unshare"
    refusing.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setattr(backends.os, "geteuid", lambda: 0)
    monkeypatch.setattr(backends.shutil, "which", lambda name: str(refusing) if name == "unshare" else None)
    with pytest.raises(backends.BackendError) as refused:
        backends._as_unprivileged()
    message = str(refused.value)
    assert "refuses the user namespace" in message and "Operation not permitted" in message, message
    assert "Run as a user other than root" in message
    allowing = tmp_path / "allowing"
    allowing.write_text('#!/bin/sh\nshift 3\nexec "$@"\n')  # drops --user --map-user --map-group
    allowing.chmod(0o755)
    monkeypatch.setattr(backends.shutil, "which", lambda name: str(allowing) if name == "unshare" else None)
    assert backends._as_unprivileged() == [str(allowing), "--user", "--map-user=1000", "--map-group=1000"]
