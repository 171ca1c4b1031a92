"""What every program shares: one `error:` line per mistake, `--help`, `--list`, `--debug`.

`run(main)` calls `main(argv)` and turns what it raises into an exit (README "When something
goes wrong"):

* `errors.UserError` (bad input: a flag, config field, file, workdir): `error: <message>` as the
  last line of stderr, exit 2;
* `errors.FailureError` (the work could not be done; what is saved is kept): the same, exit 1;
* anything else is a bug: its traceback, then the `error:` line, exit 1.

`--debug` (or `SMATCH_JAX_DEBUG=1`) shows the traceback of every error. Exit hooks (pending
checkpoint writes, TensorBoard files) still run after the `error:` line, but with stderr
closed, so that it stays the last line.

`parse_config_flags` is the config entry of every program that takes a config (train,
compile), as levanter's config is the CLI of every program and big_vision loads configs with
`config_flags` everywhere: `--config=FILE[:VARIANT]` (`CONFIG`, the one absl flag of that name),
its file run once; every `--config.a.b=VALUE` override must name a field (else `unknown config key
'loss.temprature'; did you mean 'loss.temperature'?`) before absl applies them; then the whole
config is checked (`validate.check_config`). Each mistake is one `error:` line (exit 2), before
any JAX or data work. `--help` lists the program's flags, every missing required flag is named
at once, and `--config=FILE[:VARIANT] --list` prints the file's variants and every config field
with its value, default and comment. The programs without a config (argparse, `ArgumentParser`)
refuse `--config` and its overrides with one line saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from smatch_jax.errors import FailureError, UserError

DEBUG_ENV = "SMATCH_JAX_DEBUG"
DEBUG_HELP = f"--debug: show the traceback of every error (or set {DEBUG_ENV}=1)"


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(message: str) -> str:
    """A multi-line message as one line (its lines joined by '; ')."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts).replace(":;", ":")


class _Formatter(logging.Formatter):
    """INFO as the message itself, WARNING and above prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_logging(level: int = logging.INFO) -> None:
    """Our messages on stderr, one line each; the libraries' INFO chatter off."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("smatch_jax").setLevel(level)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
        absl_logging.use_python_logging(quiet=True)
    except ImportError:
        pass


def _finish(code: int, message: str | None) -> None:
    """Print the error line last: the exit hooks after it run with stderr closed."""
    sys.stdout.flush()
    if message is not None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (until exit)
    sys.exit(code)


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> None:
    """`main(argv)` with the errors above turned into one `error:` line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    setup_logging()
    try:
        main(argv)
    except (UserError, FailureError) as e:
        if debug:
            traceback.print_exc()
        _finish(e.exit_code, one_line(e))
    except KeyboardInterrupt:
        _finish(130, "interrupted (Ctrl-C)")
    except SystemExit:
        raise
    except Exception as e:  # a bug: show where
        traceback.print_exc()
        what = one_line(f"{type(e).__name__}: {e}")[:300]
        _finish(1, f"{what} (an internal error: please report it with the traceback above)")
    _finish(0, None)


# `--config=FILE[:VARIANT]` (or `--config FILE`) and an override `--config.a.b=V`
# (`--noconfig.a.b` for False): the forms ml_collections' config_flags reads.
_CONFIG_SPEC = re.compile(r"^--?config(=|$)")
_CONFIG_OVERRIDE = re.compile(r"^--?(no)?config\.")
CONFIG_PROGRAMS = "train (python -m smatch_jax.main) and compile"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one `error:` line (exit 2) and `--debug` in its help. A program built
    on it takes no config: `--config` or an override is refused with one line saying so
    (`config_note`: where this program's settings come from instead)."""

    def __init__(self, *args, config_note: str = "", **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("epilog", DEBUG_HELP)
        super().__init__(*args, **kwargs)
        self.config_note = config_note

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        given = [a for a in args if _CONFIG_SPEC.match(a) or _CONFIG_OVERRIDE.match(a)]
        if given and not any(o.startswith("--config") for o in self._option_string_actions):
            note = f" ({self.config_note})" if self.config_note else ""
            raise UserError(
                f"{given[0]}: {self.prog} takes no config{note}; only {CONFIG_PROGRAMS} "
                "take --config and --config.<field>"
            )
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def existing_file(kind: str) -> Callable[[str], str]:
    """An argparse type: a path that must be a readable file."""

    def check(path: str) -> str:
        if not Path(path).is_file():
            raise argparse.ArgumentTypeError(f"{kind} file {path!r} does not exist")
        return path

    return check


# ------------------------------------------- the config entry of every program with --config


def load_config_file(spec: str):
    """(module, ConfigDict) of `FILE[:VARIANT]`; a missing file or unknown variant is a
    UserError naming the choices."""
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        raise UserError(f"--config file {path!r} does not exist (e.g. configs/arithmetic.py)")
    module_spec = importlib.util.spec_from_file_location("_smatch_config", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(Path(path).resolve().parent.parent))  # `from configs import ...`
    try:
        module_spec.loader.exec_module(module)
        try:
            config = module.get_config(arg) if arg else module.get_config()
        except ValueError as e:  # the files' own "unknown variant" errors
            raise UserError(f"--config={spec}: {e}") from None
    finally:
        sys.path.pop(0)
    return module, config


def _config_spec(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the --config value, the keys of its --config.<key> overrides) in argv."""
    spec, keys = None, []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if _CONFIG_SPEC.match(arg):
            spec = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        elif m := _CONFIG_OVERRIDE.match(name):
            keys.append(name[m.end() :])
    return spec, keys


def config_listing(spec: str) -> str:
    """The variants of a config file and every field of `spec`'s config: value, default
    (when it differs) and the comment of the section that owns it."""
    from smatch_jax import config as config_lib
    from smatch_jax.sections import field_comments, flatten

    module, config = load_config_file(spec)
    path = spec.partition(":")[0]
    lines = [f"{path}: {(module.__doc__ or '').strip().splitlines()[0]}", ""]
    variants = getattr(module, "VARIANTS", ())
    if variants:
        lines.append(f"variants (--config={path}:NAME, combine with commas):")
        lines += [f"  {v}" for v in variants]
        lines.append("")
    lines.append(f"fields of --config={spec} (override with --config.<field>=VALUE):")
    defaults = flatten(config_lib.base_config())
    comments = {
        (f"{cls.NAME}.{k}" if cls.NAME else k): text
        for cls in config_lib.section_classes()
        for k, text in field_comments(cls).items()
    }
    for key, value in flatten(config).items():
        default = defaults.get(key)
        note = "" if value == default else f"  (default {default!r})"
        comment = comments.get(key, "")
        lines.append(f"  {key} = {value!r}{note}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines)


def load_and_check_overrides(argv: Sequence[str]):
    """The config of `--config=FILE[:VARIANT]` in `argv` (None without one), its file run once
    (a missing file or variant: a UserError), after checking that every `--config.<key>`
    override names a field (a ConfigError with the closest key); absl would report either
    deep inside flag parsing, with a long traceback."""
    spec, keys = _config_spec(argv)
    if not spec:
        return None
    _, config = load_config_file(spec)
    if keys:
        from smatch_jax import validate

        validate.check_override_keys(config, keys)
    return config


class _LoadedConfigParser(flags.ArgumentParser):
    """absl's parser of `--config` (in place of config_flags' own, which would run the file
    again): the config `parse_config_flags` has loaded and checked, locked so that an
    override cannot add a field."""

    def __init__(self):
        self.loaded: tuple[str, object] | None = None

    def flag_type(self) -> str:
        return "config object"

    def parse(self, path: str):
        if self.loaded is not None and self.loaded[0] == path:
            config, self.loaded = self.loaded[1], None
        else:  # not loaded by parse_config_flags (an empty --config=)
            _, config = load_config_file(path)
        config.lock()
        return config


# The argv that `parse_config_flags` parses: config_flags reads the overrides to define from
# it (by default it reads sys.argv, which `run(main, argv)` need not have).
_ARGV: list[str] = []
# The one `--config` flag: train and compile import this module and read `CONFIG.value`, so
# no program defines it (nor hides its own flags in a function to dodge a clash).
CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config FILE[:VARIANT]", lock_config=True, sys_argv=_ARGV
)
_PARSER = _LoadedConfigParser()
flags.FLAGS["config"].parser = _PARSER

CONFIG_HELP = "\n  ".join(
    [
        "  --config=FILE[:VARIANT]: the experiment config (configs/*.py; variants joined by ',')",
        "--config.<field>=VALUE: override one field, e.g. --config.loss.chi2_coef=0.5 (an",
        "  unknown field is named with the closest one; --noconfig.<field>: a bool False)",
        "--config=FILE[:VARIANT] --list: the config's variants, and every field with its",
        "  value, default and comment",
        DEBUG_HELP,
    ]
)


def parse_config_flags(argv: Sequence[str], *, doc: str, module_name: str, required: Sequence[str]):
    """The config entry of every program that takes a config: parse `argv` (without the
    program name) into absl's FLAGS and return the config, checked.

    `--help` prints `doc` and the program's flags; `--config=F --list` prints the config's
    variants and fields. Otherwise the config file runs once, every override must name a
    field (`validate.check_override_keys`: the closest key), absl applies the overrides (a
    value of the wrong type names its flag), every missing required flag is named at once,
    and the whole config is checked (`validate.check_config`): each a UserError, one line.
    """
    argv = list(argv)
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv):
        program_flags = flags.FLAGS.module_help(module_name).strip().partition("\n")[2]
        print(f"{doc.strip()}\n\nflags:\n{CONFIG_HELP}\n{program_flags}")  # no module name
        sys.exit(0)
    spec, _ = _config_spec(argv)
    if "--list" in argv:
        if not spec:
            raise UserError("--list lists a config: pass --config=FILE[:VARIANT] with it")
        print(config_listing(spec))
        sys.exit(0)
    if sum(bool(_CONFIG_SPEC.match(a)) for a in argv) > 1:
        raise UserError("--config is given twice; give it once (variants: FILE:a,b)")
    config = load_and_check_overrides(argv)
    _PARSER.loaded = (spec, config) if spec else None
    if not spec:  # overrides of no config: name the missing --config below, as absl would not
        argv = [a for a in argv if not _CONFIG_OVERRIDE.match(a)]
    _ARGV[:] = ["prog", *argv]
    try:
        flags.FLAGS(["prog", *argv])
    except flags.Error as e:
        raise UserError(f"{one_line(e)} (see --help)") from None
    finally:
        _PARSER.loaded = None
    missing = [f"--{name}" for name in required if flags.FLAGS[name].value is None]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (see --help)")
    from smatch_jax import validate

    validate.check_config(CONFIG.value)  # every problem at once, before any work
    return CONFIG.value
