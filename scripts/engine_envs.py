#!/usr/bin/env python3
"""Build the real engines' Python environments, outside git, from the project's own pins.

Each real engine pins its own torch, so each gets a virtual environment of its own:

    ${OTEL_STEPSPAN_ENGINES_DIR:-~/.cache/otel_stepspan/engines}/<engine>-<hash of its pins>/

What goes in is written down in ``tests/real_engines/<engine>/`` only:

* ``nodeps.txt``: pinned requirements installed with ``--no-deps`` (an engine whose full
  dependency set pulls CUDA-only kernels gets just the packages it really imports);
* ``requirements.txt``: pinned requirements installed with their dependencies;
* the OpenTelemetry packages otel_stepspan needs (``pyproject.toml``'s dependencies, minus torch,
  which the engine pins itself), constrained by the two files above.

otel_stepspan itself is not installed there: the tests put the checkout under test first on
``PYTHONPATH``, so one cached environment serves every clone. A changed pin changes the hash, so
the next build makes a new environment; an interrupted build never leaves one that looks done.

CLI (stdlib only):
    python scripts/engine_envs.py build [ENGINE ...]   # build what is missing; print the pythons
    python scripts/engine_envs.py python ENGINE         # the python of a built environment
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SPECS_DIR = REPO_ROOT / "tests" / "real_engines"
SPEC_FILES = ("nodeps.txt", "requirements.txt")
DONE = ".built"


def _log(message: str) -> None:
    print(f"[engine_envs] {message}", file=sys.stderr, flush=True)


def engines() -> list[str]:
    """The engines with pins in the repository."""
    if not SPECS_DIR.is_dir():
        return []
    return sorted(d.name for d in SPECS_DIR.iterdir() if any((d / f).is_file() for f in SPEC_FILES))


def engines_dir() -> Path:
    configured = os.environ.get("OTEL_STEPSPAN_ENGINES_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "otel_stepspan" / "engines"


def otel_requirements() -> list[str]:
    """otel_stepspan's own dependencies, minus torch (the engine brings its own)."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        deps = tomllib.load(handle)["project"]["dependencies"]
    return [d for d in deps if re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].strip().lower() != "torch"]


def _spec_hash(engine: str) -> str:
    digest = hashlib.sha256()
    for name in SPEC_FILES:
        path = SPECS_DIR / engine / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    digest.update("\n".join(otel_requirements()).encode())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return digest.hexdigest()[:12]


def env_dir(engine: str) -> Path:
    return engines_dir() / f"{engine}-{_spec_hash(engine)}"


def python_of(engine: str) -> Path:
    return env_dir(engine) / "bin" / "python"


def is_built(engine: str) -> bool:
    return (env_dir(engine) / DONE).is_file()


def _pip(python: Path, *args: str) -> None:
    argv = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off", *args]
    _log("$ " + " ".join(argv))
    subprocess.run(argv, check=True)


def build(engine: str, *, force: bool = False) -> Path:
    """Build ``engine``'s environment if missing; returns its python."""
    spec = SPECS_DIR / engine
    if engine not in engines():
        raise SystemExit(f"engine_envs: no pins for {engine!r} in {SPECS_DIR} (known: {', '.join(engines()) or 'none'})")
    target = env_dir(engine)
    if is_built(engine) and not force:
        return python_of(engine)
    started = time.monotonic()
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    _log(f"building the {engine} environment in {target} (first time: minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    python = building / "bin" / "python"
    nodeps, requirements = spec / "nodeps.txt", spec / "requirements.txt"
    constraints: list[str] = []
    for path in (nodeps, requirements):
        if path.is_file():
            constraints += ["-c", str(path)]
    if nodeps.is_file():
        _pip(python, "--no-deps", "-r", str(nodeps))
    if requirements.is_file():
        _pip(python, "-r", str(requirements), *constraints)
    _pip(python, *otel_requirements(), *constraints)
    (building / DONE).write_text(f"built in {time.monotonic() - started:.0f} s\n")
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    # The venv's scripts name the folder they were made in: make them name the final one.
    for script in (target / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            try:
                text = script.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            if str(building) in text:
                script.write_text(text.replace(str(building), str(target)))
    _log(f"{engine} environment ready in {time.monotonic() - started:.0f} s: {python_of(engine)}")
    return python_of(engine)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the missing environments (all engines by default); print their pythons")
    b.add_argument("engine", nargs="*", help=f"engines to build (default: all of {', '.join(engines()) or 'none'})")
    b.add_argument("--force", action="store_true", help="rebuild even when built")
    p = sub.add_parser("python", help="print the python of a built environment (exit 1 when not built)")
    p.add_argument("engine")
    args = parser.parse_args(argv)
    if args.command == "build":
        for engine in args.engine or engines():
            print(build(engine, force=args.force))
        return 0
    if not is_built(args.engine):
        print(f"engine_envs: {args.engine} is not built; run: python scripts/engine_envs.py build {args.engine}",
              file=sys.stderr)
        return 1
    print(python_of(args.engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
