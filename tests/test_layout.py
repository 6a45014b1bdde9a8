"""The package's layout contracts: library code never imports an entry point (sbs_jax/cli), and
every documented command answers --help, without loading JAX or TensorFlow where it can."""

import ast
import concurrent.futures
import pathlib
import subprocess
import sys
import tomllib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# `python -m` entry points users and launchers run (README, launch/, the grid's cells).
MODULES = ("sbs_jax.train", "sbs_jax.eval", "sbs_jax.infer", "sbs_jax.teacher",
           "sbs_jax.teacher.beam_job", "sbs_jax.data.build", "sbs_jax.data.stats",
           "sbs_jax.convert", "sbs_jax.experiments", "sbs_jax.quickstart", "sbs_jax.tasks",
           "sbs_jax.cli.cluster_check")
SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# What --help may load: listing the tasks registers them, which loads seqio and TensorFlow by
# design; the Beam job's module is the pipeline itself.
MAY_LOAD = {"sbs_jax.tasks": {"tensorflow", "jax"}, "sbs_jax.teacher.beam_job": {"apache_beam"}}
HEAVY = ("jax", "tensorflow", "torch", "apache_beam")


def _imports_cli(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "sbs_jax.cli" or a.name.startswith("sbs_jax.cli.")
                   for a in node.names)
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return (node.module == "sbs_jax.cli" or node.module.startswith("sbs_jax.cli.")
                or (node.module == "sbs_jax" and any(a.name == "cli" for a in node.names)))
    return False


def _cli_imports_outside_main_guard(tree: ast.Module) -> list[int]:
    """Lines importing sbs_jax.cli anywhere but in an `if __name__ == "__main__":` block."""
    guarded = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
                "__name__ == '__main__'", "'__main__' == __name__"):
            guarded.update(id(n) for n in ast.walk(node))
    return [n.lineno for n in ast.walk(tree) if _imports_cli(n) and id(n) not in guarded]


def test_library_code_never_imports_an_entry_point():
    library = [p for root in ("sbs_jax", "tasks") for p in (REPO_ROOT / root).rglob("*.py")
               if "cli" not in p.relative_to(REPO_ROOT).parts[:2] and p.name != "__main__.py"]
    offenders = {str(p.relative_to(REPO_ROOT)): lines for p in library
                 if (lines := _cli_imports_outside_main_guard(ast.parse(p.read_text())))}
    assert len(library) > 50 and not offenders, offenders


def test_the_import_check_sees_every_form_of_cli_import():
    found = _cli_imports_outside_main_guard(ast.parse(
        "import sbs_jax.cli.train\nfrom sbs_jax.cli import eval\nfrom sbs_jax import cli\n"
        "def f():\n    from sbs_jax.cli.infer import main\n"
        "if __name__ == '__main__':\n    from sbs_jax.cli import convert\n"))
    assert found == [1, 2, 3, 5]


def _help(command: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
    return command, subprocess.run(command, capture_output=True, text=True, timeout=300,
                                   cwd=REPO_ROOT, check=False)


def _runner(call: str) -> str:
    """Python that runs `call` as the command line `... --help` and reports the heavy
    libraries it loaded on stderr."""
    return (f"import sys\ntry:\n    {call}\nexcept SystemExit as exc:\n    code = exc.code\n"
            f"print('loaded:', *[m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
            "sys.exit(code)\n")


@pytest.fixture(scope="module")
def help_runs() -> dict[str, subprocess.CompletedProcess]:
    """`--help` of every entry point: `python -m M` as runpy runs it, and each console script's
    target as its generated wrapper calls it (`sys.exit(main())`, flags from sys.argv)."""
    commands = {module: [sys.executable, "-c", _runner(
        f"import runpy; sys.argv[0] = {module!r}; "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"), "--help"]
        for module in MODULES}
    for script, target in SCRIPTS.items():
        module, function = target.split(":")
        commands[script] = [sys.executable, "-c", _runner(
            f"sys.argv[0] = {script!r}; from {module} import {function}; "
            f"code = {function}()"), "--help"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        done = dict(zip(commands, pool.map(lambda c: _help(c)[1], commands.values())))
    return done


@pytest.mark.parametrize("name", [*MODULES, *SCRIPTS])
def test_every_entry_point_answers_help(help_runs, name):
    result = help_runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout, result.stdout[:500]
    loaded = result.stderr.rsplit("loaded:", 1)[1].split()
    assert set(loaded) <= MAY_LOAD.get(name, set()), f"--help of {name} loads {loaded}"


def test_every_console_script_lives_in_cli():
    assert SCRIPTS and all(t.startswith("sbs_jax.cli.") for t in SCRIPTS.values()), SCRIPTS
