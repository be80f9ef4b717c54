#!/usr/bin/env python3
"""Check every engine release in the tested range for the integrations' patch points.

The real-engine tiers run one release of each engine end to end (sglang 0.5.23, vLLM's CPU
build 0.32.0). The range the integrations declare (their ``_instruments``) is wider, so each
release in it is checked here the way ``otel-stepspan doctor`` checks an installed engine: every
patch point, with the parameters its wrapper reads, found in the release's own source. The
source comes from the release's wheel from PyPI (no dependencies, not installed: vLLM's GPU
wheels need CUDA to import, but their source reads anywhere), cached outside git:

    ${OTEL_STEPSPAN_RELEASES_DIR:-~/.cache/otel_stepspan/releases}/<name>-<version>-*.whl

The releases: :data:`RELEASES` below, which must cover the declared ranges
(``tests/test_engine_releases.py`` checks both).

CLI:
    python scripts/engine_releases.py download      # fetch the missing wheels (about 1.4 GB)
    python scripts/engine_releases.py check         # download, then one line per release
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

#: The releases each integration is tested with: the last three sglang 0.5.x, and vLLM from
#: 0.30 on (GPU builds, the wheels PyPI serves as ``vllm``).
RELEASES: dict[str, tuple[str, ...]] = {
    "sglang": ("0.5.21", "0.5.22", "0.5.23"),
    "vllm": ("0.30.0", "0.31.0", "0.32.0", "0.33.0"),
}
#: The platform the wheels are fetched for (they are read, never installed or imported).
_PLATFORM = ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--platform",
             "manylinux_2_34_x86_64", "--platform", "manylinux_2_17_x86_64")


def _log(message: str) -> None:
    print(f"[engine_releases] {message}", file=sys.stderr, flush=True)


def releases_dir() -> Path:
    configured = os.environ.get("OTEL_STEPSPAN_RELEASES_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "otel_stepspan" / "releases"


def wheel_of(engine: str, version: str) -> Optional[Path]:
    found = sorted(releases_dir().glob(f"{engine}-{version}-*.whl"))
    return found[0] if found else None


def download(engine: str, version: str) -> Path:
    """The release's wheel, fetched once. pip writes it under a temporary name first, so an
    interrupted download never looks done."""
    wheel = wheel_of(engine, version)
    if wheel is not None:
        return wheel
    target = releases_dir()
    target.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {engine}=={version} (no dependencies) into {target}")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", *_PLATFORM,
         f"{engine}=={version}", "-d", str(target)],
        capture_output=True, text=True,
    )
    wheel = wheel_of(engine, version)
    if result.returncode != 0 or wheel is None:
        raise SystemExit(f"engine_releases: cannot download {engine}=={version}: {result.stderr.strip()[-2000:]}")
    _log(f"{wheel.name}: {wheel.stat().st_size / 2**20:.0f} MiB in {time.monotonic() - started:.0f} s")
    return wheel


def check_release(engine: str, version: str) -> list:
    """Every patch point of ``engine``'s integration in that release's source: a list of
    :class:`otel_stepspan.cli.doctor.PointReport`."""
    from otel_stepspan.cli.doctor import check_source
    from otel_stepspan.integrations import sglang, vllm

    integration = {"sglang": sglang, "vllm": vllm}[engine]
    with zipfile.ZipFile(download(engine, version)) as wheel:
        names = set(wheel.namelist())

        def source_of(module: str) -> Optional[str]:
            base = module.replace(".", "/")
            for member in (base + ".py", base + "/__init__.py"):
                if member in names:
                    return wheel.read(member).decode("utf-8")
            return None

        return [check_source(point, source_of(point.module), [version]) for point in integration.patch_points()]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("download", "check"))
    args = parser.parse_args(argv)
    failed = 0
    for engine, versions in RELEASES.items():
        for version in versions:
            if args.command == "download":
                download(engine, version)
                continue
            problems = [p for p in check_release(engine, version) if not p.ok]
            failed += bool(problems)
            print(f"{engine} {version}: " + ("every patch point found" if not problems else "; ".join(
                f"{p.target} {p.problem}" for p in problems)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
