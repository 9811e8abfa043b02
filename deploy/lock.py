"""Write the pip locks of the two images built here (deploy/README.md, "Locked dependencies").

The nptm image, deploy/constraints.txt, from a resolved environment: run it with the
interpreter of an environment where nptm is installed and its tests pass (Python 3.11 on Linux
x86-64, as in the image):

    .venv/bin/python deploy/lock.py > deploy/constraints.txt

It pins, at the installed version, every distribution in the closure of pyproject.toml's
`[project] dependencies` (extras and environment markers followed). Two exceptions keep the lock
true to the image's CUDA:

- torch and torchvision are pinned to the same release with the CUDA tag of the Dockerfile's base
  image (e.g. ``torch==2.14.1+cu128``); the Dockerfile installs them from PyTorch's index for that
  tag. The environment's own build (CPU or another CUDA) does not matter.
- what the environment's torch build pulls in only for its CUDA is left out: the torch wheel of
  the image pins its own CUDA libraries, exactly, in its metadata, and the environment's may be
  another CUDA major (a CUDA-13 torch brings ``cuda-toolkit==13.*``, ``cuda-bindings==13.*``,
  ``nvidia-*-cu13``, ``triton``). That set is read from torch's (and torchvision's) own
  ``Requires-Dist``: the requirements tied to the platform (a CUDA wheel marks each CUDA library
  ``platform_system == "Linux"``; a CPU wheel has none), followed to their closure (extras
  included, e.g. ``cuda-toolkit[cublas]`` -> ``nvidia-cublas``), less whatever the rest of the
  dependency graph needs anyway. A name guard (``nvidia-*``, ``cuda-*``, ``triton``) drops
  those names even where the metadata does not lead to them.

The MLflow image, deploy/mlflow-constraints.txt, from pip's resolution of its three pins
(pip's installation report, https://pip.pypa.io/en/stable/reference/installation-report/):

    pip install --dry-run --ignore-installed --quiet --report report.json \
        "mlflow[auth]==X" "psycopg2-binary==Y" "boto3==Z"
    python deploy/lock.py --pip-report report.json > deploy/mlflow-constraints.txt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from collections.abc import Callable, Collection, Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
CUDA_BUILDS = ("torch", "torchvision")  # pinned with the base image's CUDA tag
# Guard: never pinned, whatever the metadata says (the image's torch wheel pins its own).
FROM_TORCH_BUILD = re.compile(r"^(nvidia-.*|cuda-.*|triton)$")
PLATFORM_MARKER = re.compile(r"\b(platform_system|sys_platform|platform_machine)\b")

# (installed version, Requires-Dist lines) of a distribution, by name.
Metadata = Callable[[str], tuple[str, list[str]]]


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    data = tomllib.loads(pyproject.read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def base_image_cuda_tag(dockerfile: Path = ROOT / "Dockerfile") -> str:
    """`cu128` from `FROM rayproject/ray:2.60.0-py311-cu128`."""
    m = re.search(r"^FROM\s+\S+-(cu\d+)\b", dockerfile.read_text(), re.MULTILINE)
    if not m:
        raise SystemExit(f"lock.py: no CUDA tag in the FROM line of {dockerfile}")
    return m.group(1)


def installed(name: str) -> tuple[str, list[str]]:
    """The `Metadata` of this environment."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"lock.py: {name} is required but not installed") from None
    return dist.version, list(dist.requires or [])


def requirements(
    name: str, extras: Collection[str] = (), meta: Metadata = installed
) -> list[Requirement]:
    """What `name` (with `extras`) requires here: its Requires-Dist whose markers hold on this
    platform."""
    wanted = [{"extra": e} for e in extras] or [{"extra": ""}]
    found = []
    for line in meta(name)[1]:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate(env) for env in wanted):
            found.append(req)
    return found


def closure(
    roots: Iterable[Requirement],
    meta: Metadata = installed,
    *,
    skip: Callable[[str, Requirement], bool] = lambda parent, req: False,
) -> dict[str, str]:
    """{canonical name: installed version} of `roots` and everything they require here.
    `skip(parent, requirement)`: requirements not followed."""
    found: dict[str, str] = {}
    pending = [(r, frozenset(r.extras)) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        req, extras = pending.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        found[name] = meta(req.name)[0]
        for sub in requirements(req.name, extras, meta):
            if not skip(name, sub):
                pending.append((sub, frozenset(sub.extras)))
    return found


def _for_cuda(parent: str, req: Requirement) -> bool:
    """Whether `req`, a requirement of `parent`, is one a torch build has for its CUDA."""
    return parent in CUDA_BUILDS and (
        bool(FROM_TORCH_BUILD.match(canonicalize_name(req.name)))
        or (req.marker is not None and bool(PLATFORM_MARKER.search(str(req.marker))))
    )


def torch_build_libraries(roots: list[Requirement], meta: Metadata = installed) -> set[str]:
    """Names of what the environment's torch (and torchvision) build pulls in only for its
    CUDA: the closure of their CUDA requirements (`_for_cuda`), less what the dependency
    graph of `roots` needs without them."""
    pins = closure(roots, meta)
    cuda_roots = [
        req
        for build in CUDA_BUILDS
        if build in pins
        for req in requirements(build, meta=meta)
        if _for_cuda(build, req)
    ]
    needed = closure(roots, meta, skip=_for_cuda)
    return set(closure(cuda_roots, meta)) - set(needed)


def lock_lines(pins: dict[str, str], cuda_tag: str, drop: Collection[str] = ()) -> list[str]:
    """The `name==version` lines of the lock: `pins` less `drop` and the name guard, torch and
    torchvision with `cuda_tag`."""
    lines = []
    for name in sorted(pins):
        if name in drop or FROM_TORCH_BUILD.match(name):
            continue
        version = pins[name]
        if name in CUDA_BUILDS:
            version = f"{version.split('+')[0]}+{cuda_tag}"
        lines.append(f"{name}=={version}")
    return lines


def pip_report_pins(report: Path) -> dict[str, str]:
    """{canonical name: version} of what pip's installation report would install."""
    install = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in install}


def _extras(names: list[str] | None) -> str:
    return f"[{','.join(names)}]" if names else ""


def print_mlflow_lock(report: Path) -> None:
    requested = [i for i in json.loads(report.read_text())["install"] if i.get("requested")]
    roots = " ".join(
        f"{i['metadata']['name']}{_extras(i.get('requested_extras'))}=={i['metadata']['version']}"
        for i in requested
    )
    pins = pip_report_pins(report)
    print(
        "# Lock of the MLflow server image (deploy/mlflow.Dockerfile): pip's full resolution of\n"
        f"#   {roots}\n"
        "# for CPython 3.11 on Linux x86-64. Generated by deploy/lock.py --pip-report (see there\n"
        "# and deploy/README.md to regenerate)."
    )
    print("\n".join(f"{name}=={pins[name]}" for name in sorted(pins)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pip-report", type=Path, help="write the MLflow image's lock instead")
    args = parser.parse_args(argv)
    if args.pip_report:
        print_mlflow_lock(args.pip_report)
        return 0
    cuda_tag = base_image_cuda_tag()
    roots = project_requirements()
    pins = closure(roots)
    drop = torch_build_libraries(roots)
    print(
        "# Lock of the nptm image: every dependency of pyproject.toml's [project] dependencies,\n"
        "# at the version resolved in a tested environment. Generated by deploy/lock.py;\n"
        "# regenerate: `.venv/bin/python deploy/lock.py > deploy/constraints.txt`\n"
        "# (deploy/README.md, 'Locked dependencies').\n"
        f"# torch/torchvision: CUDA build {cuda_tag} of the base image, from PyTorch's {cuda_tag}\n"
        "# index; their CUDA libraries (nvidia-*, cuda-*, triton) are pinned by the torch wheel\n"
        "# itself, so none of the generating environment's torch build is here.\n"
        f"# Python {sys.version_info.major}.{sys.version_info.minor}, {sys.platform}."
    )
    print("\n".join(lock_lines(pins, cuda_tag, drop)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
