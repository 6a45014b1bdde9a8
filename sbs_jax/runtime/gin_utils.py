"""T5X-style gin flags for the train / eval / infer entry points.

Flags: repeated `--gin_file=PATH`, repeated `--gin_bindings='name.param = value'`,
`--gin.NAME=VALUE` (shorthand for the binding `NAME = VALUE`: mostly the macros such as
`--gin.MODEL_DIR="'/tmp/run'"`), `--gin_search_paths=a,b` (where `--gin_file` and
`include` look), and T5X's `--seqio_additional_cache_dirs=a,b` (seqio task caches, read with
`--gin.USE_CACHED_TASKS=True`). The folder holding the shipped `gin/` is always searched first, so
`gin/sbs_base.gin` works from any directory, in a checkout and in an installed sbs-jax alike
(as T5X puts its own configs on gin's search path): the repository's `gin/` in a checkout, the
package data `sbs_jax/gin/` that the wheel makes of it when installed (pyproject.toml maps the
package `sbs_jax.gin` onto `gin/`). Mistakes fail before any work starts,
with the file, binding or macro named:
gin's own errors for unknown configurables/parameters are re-raised with their source, and a
`--gin.NAME` macro that no gin file defines (a typo such as `TRAIN_STEP`) is refused instead of
silently defining a new, unused macro. A string value whose quotes the shell removed
(`--gin.MODEL_DIR=/tmp/x`) is refused with the quoting that works (`--gin.MODEL_DIR="'/tmp/x'"`).
Only gin's public API is used.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import re
import sys
import tokenize
from collections.abc import Sequence
from typing import NoReturn

import gin

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(PACKAGE_DIR)
# The folder holding the shipped gin/: the installed package (its data sbs_jax/gin/), else the
# repository (a checkout, an editable install).
CONFIG_ROOT = PACKAGE_DIR if os.path.isdir(os.path.join(PACKAGE_DIR, "gin")) else REPO_ROOT
_MACRO = re.compile(r"^[A-Z][A-Z0-9_]*$")
# A macro's line in gin.config_str(): `NAME = value`.
_MACRO_LINE = re.compile(r"^([A-Z][A-Z0-9_]*) = ", re.MULTILINE)
# Folders this process has put on gin's search path (gin has no public way to list them).
_SEARCH_PATHS_ADDED: set[str] = set()


class GinConfigError(ValueError):
    """A gin file or binding is wrong; the message names it."""


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --gin_file, --gin_bindings and --gin_search_paths (and documents --gin.NAME), and
    T5X's --seqio_additional_cache_dirs."""
    group = parser.add_argument_group(
        "gin", "T5X-style configuration; also --gin.NAME=VALUE as a shorthand for a binding "
        "(e.g. --gin.MODEL_DIR=\"'/tmp/run'\" --gin.TRAIN_STEPS=100)")
    group.add_argument("--gin_file", action="append", default=[],
                       help="gin file to load (repeatable; later files override earlier ones)")
    group.add_argument("--gin_bindings", action="append", default=[],
                       help="one gin binding, e.g. \"RunConfig.schedule = 'cosine'\" (repeatable)")
    group.add_argument("--gin_search_paths", action="append", default=[],
                       help="comma-separated folders searched for gin files and includes")
    parser.add_argument("--seqio_additional_cache_dirs", action="append", default=[],
                        help="comma-separated folders of seqio task caches "
                             "(launch/seqio_cache.sh), read with --gin.USE_CACHED_TASKS=True")


def split_gin_shorthand(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--gin.NAME=VALUE` / `--gin.NAME VALUE` flags (as bindings) from the rest."""
    rest, bindings = [], []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg.startswith("--gin."):
            name, sep, value = arg[len("--gin."):].partition("=")
            if not sep:
                if i + 1 >= len(items):
                    raise GinConfigError(f"{arg} has no value; write {arg}=VALUE")
                value = items[i + 1]
                i += 1
            if not name:
                raise GinConfigError(f"{arg!r}: missing the name after --gin.")
            bindings.append((name, value))
        else:
            rest.append(arg)
        i += 1
    return rest, [f"{name} = {value}" for name, value in bindings]


def _macro_defined(name: str) -> bool:
    try:
        gin.query_parameter(f"%{name}")
    except ValueError:
        return False
    return True


def _macro_names() -> list[str]:
    """Names of every macro in the currently parsed config (for error messages)."""
    return sorted(set(_MACRO_LINE.findall(gin.config_str())))


def _unquoted_string_hint(binding: str, flag: str) -> str:
    """Advice when a binding's value is bare text gin cannot read, most often a string whose
    quotes the shell removed (`--gin.MODEL_DIR=/tmp/x`); "" for any other value."""
    name, sep, value = binding.partition("=")
    name, value = name.strip(), value.strip()
    if not sep or not value or value[0] in "%@'\"([{":
        return ""
    try:
        ast.literal_eval(value)
    except (ValueError, SyntaxError):
        quoted = f"'{value}'"
        example = (f'--gin.{name}="{quoted}"' if flag == "--gin."
                   else f'--gin_bindings="{name} = {quoted}"')
        return (f"{name} = {value}: gin reads {value!r} as no value; quote strings so that the "
                f"quotes reach gin, e.g. {example} (the shell removes one pair of quotes)")
    return ""


def _quiet_package_lookups(record: logging.LogRecord) -> bool:
    """Drops gin's "Path not found: gin/models/x.gin" ERROR: before our search paths, gin tries
    each include as a resource of a Python package `gin.models`, our folder name being also
    gin-config's package; the include is then found on the search path all the same."""
    return not (record.getMessage().startswith("Path not found: ")
                and record.pathname.endswith("resource_reader.py"))


def search_path_list(search_paths: Sequence[str] = ()) -> list[str]:
    """Where gin files and includes are looked up, in order: the shipped configs' root, the
    repository root (a checkout), the working directory, then --gin_search_paths entries."""
    paths = [CONFIG_ROOT, REPO_ROOT, os.getcwd()]
    for entry in search_paths:
        paths.extend(p for p in entry.split(",") if p)
    return list(dict.fromkeys(paths))


def parse_gin(
    files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = (),
    shorthand_bindings: Sequence[str] = (),
) -> None:
    """Parses gin files then bindings (then --gin.NAME ones); raises GinConfigError on mistakes."""
    import tasks  # noqa: F401  (registers tasks.data_config so gin files may bind it)
    from sbs_jax.train import run_config  # noqa: F401  (registers RunConfig)

    gin.clear_config(clear_constants=False)
    paths = search_path_list(search_paths)
    for path in paths:
        if path not in _SEARCH_PATHS_ADDED:
            gin.add_config_file_search_path(path)
            _SEARCH_PATHS_ADDED.add(path)
    for path in files:
        if not any(os.path.exists(os.path.join(root, path)) for root in paths) and not (
            os.path.isabs(path) and os.path.exists(path)
        ):
            raise GinConfigError(f"--gin_file={path}: file not found (searched {paths})")
    root_logger = logging.getLogger()
    root_logger.addFilter(_quiet_package_lookups)
    try:
        gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)
    except (OSError, ValueError, KeyError, SyntaxError, tokenize.TokenError) as exc:
        hints = [h for h in (_unquoted_string_hint(b, "--gin_bindings") for b in bindings) if h]
        raise GinConfigError(f"invalid gin configuration: {'; '.join(hints) or exc}") from exc
    finally:
        root_logger.removeFilter(_quiet_package_lookups)
    for binding in shorthand_bindings:
        name = binding.split("=", 1)[0].strip()
        if _MACRO.match(name) and not _macro_defined(name):
            raise GinConfigError(
                f"--gin.{name}: no gin file defines the macro {name} (a typo?); "
                f"defined macros: {', '.join(_macro_names()) or 'none'}"
            )
        try:
            gin.parse_config(binding)
        except (ValueError, KeyError, SyntaxError, tokenize.TokenError) as exc:
            hint = _unquoted_string_hint(binding, "--gin.")
            raise GinConfigError(f"--gin.{hint}" if hint else f"--gin.{binding}: {exc}") from exc


def fail(parser: argparse.ArgumentParser, error: Exception | str) -> NoReturn:
    """Exits 2 with the error after the program name, as argparse's own errors do."""
    parser.exit(2, f"{parser.prog}: error: {error}\n")


def parse_flags(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """Parses the command line -> (args, the --gin.NAME bindings) and puts the
    --seqio_additional_cache_dirs folders on seqio's path; a malformed --gin.NAME exits 2."""
    raw = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, shorthand = split_gin_shorthand(raw)
    except GinConfigError as exc:
        fail(parser, exc)
    args = parser.parse_args(rest)
    add_seqio_cache_dirs(args.seqio_additional_cache_dirs)
    return args, shorthand


def parse_gin_flags(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parses the command line (gin flags included) and the gin configuration it names."""
    args, shorthand = parse_flags(parser, argv)
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. --gin_file=gin/quickstart.gin)")
    try:
        parse_gin(args.gin_file, args.gin_bindings, args.gin_search_paths, shorthand)
    except GinConfigError as exc:
        fail(parser, exc)
    return args


def add_seqio_cache_dirs(flag_values: Sequence[str]) -> None:
    """Puts the --seqio_additional_cache_dirs folders on seqio's cache search path."""
    cache_dirs = [d for entry in flag_values for d in entry.split(",") if d]
    if cache_dirs:
        import seqio

        seqio.add_global_cache_dirs(cache_dirs)
