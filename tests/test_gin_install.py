"""The shipped gin configs resolve from any directory, in a checkout and in an installed wheel:
the wheel carries the repository's gin/ as the data package `sbs_jax.gin` (no link, no copy in
the tree), and an installed sbs-jax finds `gin/sbs_base.gin` and its includes there."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import gin
from sbs_jax.runtime import gin_utils

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_checkout_searches_its_own_gin_folder_first(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    paths = gin_utils.search_path_list(["/a,/b", "/a"])
    assert paths[0] == gin_utils.CONFIG_ROOT == str(REPO_ROOT)
    assert paths[-2:] == ["/a", "/b"] and str(tmp_path) in paths
    gin_utils.parse_gin(["gin/sbs_base.gin", "gin/adafactor.gin"], ["MODEL_DIR = '/tmp/x'"])
    assert gin.query_parameter("%LEARNING_RATE") == 1.0
    # gin's package-resource probe of 'gin/models/...' (gin-config is also `gin`) stays quiet.
    assert "Path not found" not in caplog.text


def test_the_package_list_names_every_package_and_data_folder():
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    code = {".".join(p.parent.relative_to(REPO_ROOT).parts)
            for root in ("sbs_jax", "tasks") for p in (REPO_ROOT / root).rglob("__init__.py")}
    data = {"tasks.prompts"} | {
        ".".join(("sbs_jax", *p.relative_to(REPO_ROOT).parts))
        for p in [REPO_ROOT / "gin", *(REPO_ROOT / "gin").iterdir()] if p.is_dir()}
    assert listed == code | data
    assert setuptools["package-dir"] == {"sbs_jax.gin": "gin"}
    assert not (REPO_ROOT / "sbs_jax" / "gin").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """A wheel built from the tree's sources by setuptools, as pip builds one."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "sbs_jax", "tasks", "gin"):
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, src / name)
    subprocess.run([sys.executable, "-c",
                    "from setuptools import build_meta; build_meta.build_wheel('dist')"],
                   cwd=src, check=True, capture_output=True)
    return next((src / "dist").glob("*.whl"))


def test_the_wheel_carries_every_gin_config_and_prompt(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"sbs_jax/gin/{p.relative_to(REPO_ROOT / 'gin').as_posix()}"
                for p in (REPO_ROOT / "gin").rglob("*.gin")}
    assert expected and {n for n in names if n.endswith(".gin")} == expected
    assert {f"tasks/prompts/{p.name}" for p in (REPO_ROOT / "tasks" / "prompts").glob("*.txt")} \
        <= names
    assert "sbs_jax/cli/train.py" in names and "sbs_jax/train/__main__.py" in names


def test_an_installed_wheel_finds_its_gin_configs_from_any_directory(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # sbs_base.gin includes gin/base.gin and gin/models/t5_1_1_base.gin.
    check = ("import gin; from sbs_jax.runtime import gin_utils; "
             "print(gin_utils.CONFIG_ROOT); "
             "gin_utils.parse_gin(['gin/sbs_base.gin'], [\"MODEL_DIR = '/tmp/x'\"]); "
             "print(gin.query_parameter('%LEARNING_RATE'), "
             "gin.query_parameter('RunConfig.model_name'))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(site / "sbs_jax"), "5e-05", "t5_1_1_base"]


def test_no_private_gin_api_is_used():
    sources = [*REPO_ROOT.glob("sbs_jax/**/*.py"), *REPO_ROOT.glob("tasks/**/*.py")]
    private = re.compile(r"\bgin\.config\._|from gin(\.\w+)* import _")
    assert sources and not [str(p) for p in sources if private.search(p.read_text())]
