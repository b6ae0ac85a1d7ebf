"""Repository files users rely on: CITATION.cff validates against the Citation File Format
1.2.0 schema (vendored in tests/data from the CFF project, CC-BY-4.0, as shipped in cffconvert
2.0.0: the check `cffconvert --validate` makes), and the README links the conventions page."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

import mcm_prob
from mcm_prob import studies

ROOT = Path(__file__).resolve().parents[1]


def test_citation_cff_is_valid_cff_1_2_0():
    schema = json.loads((ROOT / "tests/data/cff-schema-1.2.0.json").read_text())
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cff), key=str)
    assert not errors, [e.message for e in errors]
    assert cff["version"] == mcm_prob.__version__
    paper = cff["references"][0]
    assert paper["identifiers"][0]["value"] == "arXiv:2505.01049"


def test_readme_links_the_conventions_page_it_names():
    readme = (ROOT / "README.md").read_text()
    assert "DESIGN.md" not in readme  # not in the repository: users could not read it
    assert "](docs/conventions.md)" in readme
    page = (ROOT / "docs/conventions.md").read_text()
    for name in ("alpha_t = exp(-t)", "s_k = max(t_{k+1} - tau, delta)", "`/results`", "status"):
        assert name in page


def test_every_subpackage_is_in_the_wheel():
    """A non-editable install once lacked mcm_prob.studies (`packages = ["mcm_prob"]`)."""
    import tomllib

    import setuptools

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packaged = set(setuptools.find_packages(ROOT, include=find["find"]["include"]))
    on_disk = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mcm_prob").rglob("__init__.py")
    }
    assert on_disk == packaged


@pytest.mark.parametrize(
    "script",
    [
        "smooth_steps",
        "nonsmooth_steps",
        "baselines_nfe",
        "error_injection",
        "estimation_error",
        "objectives",
    ],
)
def test_analysis_script_settings_are_valid_configs(script):
    """Each claim script's small default and --full setting are valid study configs."""
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / "analysis"))
    try:
        module = importlib.import_module(script)
    finally:
        sys.path.remove(str(ROOT / "analysis"))
    source = (ROOT / "analysis" / f"{script}.py").read_text()
    study = studies.get(re.search(r'run_claim\(__doc__, "(\w+)"', source).group(1))
    for name in ("SMALL", "QUICK", "FULL"):
        if hasattr(module, name):
            study.config_type(**getattr(module, name))


def test_analysis_script_runs_end_to_end(tmp_path):
    """The error-injection claim script (seconds) writes its file, report and plot."""
    import subprocess
    import sys

    out = tmp_path / "ei.nc"
    run = subprocess.run(
        [sys.executable, str(ROOT / "analysis/error_injection.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert out.exists() and out.with_suffix(".png").exists()
    assert "slope of log KL" in (tmp_path / "ei_report.txt").read_text()
