"""The shipped gin configs resolve from any directory and every one of them is package data, so
an installed (non-editable) sbs-jax finds `gin/sbs_base.gin` and its includes too."""

import os
import pathlib
import re
import tomllib

import gin
from sbs_jax.runtime import gin_utils

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_search_path_starts_with_the_shipped_configs_root(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    paths = gin_utils.search_path_list(["/a,/b", "/a"])
    assert paths[0] == gin_utils.CONFIG_ROOT
    assert paths[-2:] == ["/a", "/b"] and str(tmp_path) in paths
    config_gin = pathlib.Path(gin_utils.CONFIG_ROOT) / "gin"
    # In a checkout sbs_jax/gin is the repository's gin/ (a link, not a copy that could drift).
    assert config_gin.resolve() == REPO_ROOT / "gin"
    gin_utils.parse_gin(["gin/sbs_base.gin", "gin/adafactor.gin"], ["MODEL_DIR = '/tmp/x'"])
    assert gin.query_parameter("%LEARNING_RATE") == 1.0
    # gin's package-resource probe of 'gin/models/...' (gin-config is also `gin`) stays quiet.
    assert "Path not found" not in caplog.text


def test_every_gin_file_is_package_data_of_sbs_jax():
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["sbs_jax"]
    package = REPO_ROOT / "sbs_jax"
    shipped = {path for pattern in patterns for path in package.glob(pattern)
               if path.suffix == ".gin"}
    on_disk = {package / "gin" / path.relative_to(REPO_ROOT / "gin")
               for path in (REPO_ROOT / "gin").rglob("*.gin")}
    assert on_disk and shipped == on_disk, sorted(map(str, on_disk - shipped))
    assert os.path.islink(package / "gin")


def test_no_private_gin_api_is_used():
    sources = [*REPO_ROOT.glob("sbs_jax/**/*.py"), *REPO_ROOT.glob("tasks/**/*.py")]
    private = re.compile(r"\bgin\.config\._|from gin(\.\w+)* import _")
    assert sources and not [str(p) for p in sources if private.search(p.read_text())]
