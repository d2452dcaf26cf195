"""The conda recipe and pyproject.toml must describe the same package, so that neither drifts from the other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import jinja2
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
#: PyPI names whose conda-forge package is named differently.
CONDA_NAMES = {"torch": "pytorch", "matplotlib": "matplotlib-base"}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def recipe() -> dict:
    text = (ROOT / "recipe" / "meta.yaml").read_text()
    return yaml.safe_load(jinja2.Template(text, undefined=jinja2.StrictUndefined).render(PYTHON="python"))


def conda_spec(line: str) -> tuple[str, SpecifierSet]:
    """``"pytorch >=2.2"`` → ``("pytorch", SpecifierSet(">=2.2"))``."""
    name, _, spec = line.strip().partition(" ")
    return canonicalize_name(name), SpecifierSet(spec.replace(" ", ""))


def test_conda_spec_parses_bounds():
    assert conda_spec("numpy >=1.26,<3") == ("numpy", SpecifierSet("<3,>=1.26"))
    assert conda_spec("pip") == ("pip", SpecifierSet())


def test_run_requirements_match_dependencies(pyproject, recipe):
    expected = {}
    for line in pyproject["project"]["dependencies"]:
        req = Requirement(line)
        assert req.marker is None and not req.extras, f"{line!r} cannot be expressed in the conda recipe"
        name = canonicalize_name(req.name)
        expected[CONDA_NAMES.get(name, name)] = req.specifier
    run = dict(conda_spec(line) for line in recipe["requirements"]["run"])
    run.pop("python")
    assert sorted(run) == sorted(expected), "run requirements name other packages than pyproject.toml"
    different = {name: (str(run[name]), str(spec)) for name, spec in expected.items() if run[name] != spec}
    assert not different, f"bounds differ (recipe, pyproject): {different}"


def test_python_bounds(pyproject, recipe):
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    (lower,) = (s.version for s in requires if s.operator == ">=")
    run = dict(conda_spec(line) for line in recipe["requirements"]["run"])
    assert run["python"] == SpecifierSet(f">={lower}")
    assert f"python {lower}" in recipe["requirements"]["host"]
    assert f"python {lower}" in recipe["test"]["requires"]
    assert re.search(rf'set python_min = "{re.escape(lower)}"', (ROOT / "recipe" / "meta.yaml").read_text())


def test_package_fields(pyproject, recipe):
    project = pyproject["project"]
    assert recipe["package"]["name"] == canonicalize_name(project["name"])
    assert str(recipe["package"]["version"]) == project["version"]
    assert recipe["build"]["noarch"] == "python"
    assert recipe["about"]["license"] == project["license"]
    assert recipe["about"]["license_file"] in project["license-files"]
    assert (ROOT / recipe["about"]["license_file"]).is_file()
    assert re.fullmatch(r"[0-9a-f]{64}", recipe["source"]["sha256"])
    assert recipe["source"]["url"].endswith(f"/sc_c2s-{project['version']}.tar.gz")


def test_entry_points_match_scripts(pyproject, recipe):
    scripts = pyproject["project"].get("scripts", {})
    assert recipe["build"].get("entry_points", []) == [f"{name} = {target}" for name, target in scripts.items()]


def test_recipe_tests_import_and_check(recipe):
    assert "sc_c2s" in recipe["test"]["imports"]
    assert "pip check" in recipe["test"]["commands"]
    assert any(c.startswith("sc-c2s demo") for c in recipe["test"]["commands"]), "a smoke run of the command"
