"""Print a pip constraints file that pins each direct dependency to the oldest release pyproject.toml allows.

``python .ci/lowest_constraints.py > constraints.txt`` reads ``[project] dependencies`` and the ``test`` extra, and
for each requirement with a ``>=`` bound asks the index (``pip index versions``, which lists the releases this
interpreter can install, without yanked releases and pre-releases) for the oldest release at or above the bound:
``scipy>=1.11`` becomes ``scipy==1.11.1`` (1.11.0 is yanked), ``nbformat>=5`` becomes ``nbformat==5.0.2``. Then
``pip install -c constraints.txt -e ".[test]"`` installs the oldest versions we claim to support. Requirements
without a bound (``hatchling``, ``jinja2`` …) are left to pip, which takes the newest. A pin that pip cannot install,
or a version that fails the tests, means the declared bound is wrong: raise it in pyproject.toml.

Why this and not ``uv pip install --resolution lowest-direct``: uv's lowest resolution is a preference, not a pin,
so it quietly moves past a bound that cannot be installed (``tokenizers>=0.19`` beside ``transformers>=4.56``, which
needs 0.22) instead of failing; it takes the oldest release ever made of a requirement without a bound (``pyyaml``,
``umap-learn``, ``ipykernel``), which tests nothing we claim and does not even build; and it reads neither this
machine's pip configuration (the CPU torch wheel) nor is it what users run. pip, with pins, fails loudly.

torch is left out: only one build of it (2.13.0, CPU) can be installed here, so its lower bound is not tested.

Only ``>=`` is understood; any other operator stops the script, so that nobody gets a constraints file that
silently tests something else.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

try:
    from packaging.version import InvalidVersion, Version
except ImportError:  # a fresh venv has no packaging, but pip carries one
    from pip._vendor.packaging.version import InvalidVersion, Version

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
EXTRAS = ("test",)
#: Direct dependencies whose lower bound this machine cannot install, with the reason.
UNTESTED = {"torch": "only torch 2.13.0 (CPU) can be installed here"}

_REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<spec>[^;]*?)\s*$")


def normalise(name: str) -> str:
    """PEP 503 form of a project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lower_bound(requirement: str) -> tuple[str, str | None]:
    """Normalised name of a requirement and its ``>=`` bound (None when it has none)."""
    if ";" in requirement:
        msg = f"{requirement!r}: environment markers are not handled; extend {Path(__file__).name}"
        raise ValueError(msg)
    match = _REQUIREMENT.match(requirement)
    if match is None:
        msg = f"cannot parse the requirement {requirement!r}"
        raise ValueError(msg)
    name, spec = normalise(match["name"]), match["spec"]
    if not spec:
        return name, None
    bound = re.fullmatch(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
    if bound is None:
        msg = f"{requirement!r}: only a single '>=' bound is understood; extend {Path(__file__).name}"
        raise ValueError(msg)
    return name, bound[1]


def constraints(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """``{name: lower bound}`` over the runtime dependencies and the extras in `EXTRAS`, torch left out."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    bounds: dict[str, str] = {}
    for requirement in requirements:
        name, bound = lower_bound(requirement)
        if bound is None or name in UNTESTED:
            continue
        if bounds.setdefault(name, bound) != bound:
            msg = f"{name} has two lower bounds in {pyproject.name}: {bounds[name]} and {bound}"
            raise ValueError(msg)
    return bounds


def oldest_release(name: str, bound: str) -> str:
    """Oldest release of `name` at or above `bound` that this interpreter can install."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True, check=False
    )
    available = re.search(r"^Available versions: (.*)$", listed.stdout, flags=re.MULTILINE)
    if listed.returncode != 0 or available is None:
        msg = f"pip index versions {name} failed:\n{listed.stdout}{listed.stderr}"
        raise RuntimeError(msg)
    # ancient releases with names that are no versions today (dask's '0.8.1.macosx-10.5-x86_64') are skipped
    releases = [Version(v) for v in available[1].split(", ") if _is_version(v)]
    allowed = [v for v in releases if v >= Version(bound)]
    if not allowed:
        msg = f"no release of {name} satisfies >={bound} (newest: {max(releases)})"
        raise RuntimeError(msg)
    return str(min(allowed))


def _is_version(text: str) -> bool:
    try:
        Version(text)
    except InvalidVersion:
        return False
    return True


def main() -> None:
    """Write the constraints to stdout."""
    print(f"# generated by .ci/lowest_constraints.py from {PYPROJECT.name}: the oldest allowed direct dependencies")
    for name, reason in UNTESTED.items():
        print(f"# {name}: lower bound not tested, {reason}")
    for name, bound in sorted(constraints().items()):
        print(f"{name}=={oldest_release(name, bound)}  # >={bound}")


if __name__ == "__main__":
    main()
