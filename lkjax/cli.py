"""What every entry script in experiments/ shares: input checks before any work, short errors, quiet logs.

``cli.run(main)`` replaces ``absl.app.run(main)``:
  * before the flags are parsed it checks ``--config`` (the file exists, its ``:args`` parse, every
    ``--config.x.y=v`` names a known key and ``v`` has the key's type), so a typo costs a second, not a
    data preparation, and an unknown key lists its close matches;
  * third-party INFO logging (orbax's per-save lines, jax's backend probing) is off unless ``--verbosity``
    (or ``-v``) is given;
  * a usage error (``app.UsageError``) or an error the user can fix (ValueError -- `lkjax.data.shards.ShardError` among them --, OSError,
    FloatingPointError) ends the process with one paragraph on stderr and exit status 1; ``--verbosity=1``
    shows the traceback instead.
"""
from __future__ import annotations

import difflib
import glob
import os
import sys
from typing import Any, Callable, Sequence

USER_ERRORS = (ValueError, OSError, FloatingPointError)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class InputError(ValueError):
  """A bad command-line argument; the message names the argument and what to do."""


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value of ``--name=v`` / ``--name v`` / ``-name=v`` in ``argv`` (the last one wins), else None."""
  value = None
  for i, a in enumerate(argv[1:], 1):
    bare = a.lstrip("-")
    if not a.startswith("-"):
      continue
    if bare.startswith(name + "="):
      value = bare[len(name) + 1:]
    elif bare == name and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def verbosity(argv: Sequence[str] | None = None) -> int | None:
  """The ``--verbosity`` / ``-v`` the user gave (None: not given)."""
  argv = sys.argv if argv is None else argv
  for name in ("verbosity", "v"):
    raw = _flag_value(argv, name)
    if raw is not None:
      try:
        return int(raw)
      except ValueError:
        return 0
  return None


def available_configs(directory: str = CONFIG_DIR) -> list[str]:
  """Config files (``*.py`` defining ``get_config``) of ``directory``, as paths relative to the cwd."""
  out = []
  for p in sorted(glob.glob(os.path.join(directory, "*.py"))):
    with open(p) as f:
      if "def get_config" in f.read():
        out.append(os.path.relpath(p))
  return out


def close_matches(word: str, candidates, n: int = 3) -> str:
  """`` Did you mean: a, b?`` for the candidates close to ``word`` ('' when none is)."""
  found = difflib.get_close_matches(word, [str(c) for c in candidates], n=n, cutoff=0.6)
  return f" Did you mean: {', '.join(found)}?" if found else ""


def _flat_keys(config, prefix: str = "") -> list[str]:
  import ml_collections
  out = []
  for k in config.keys():
    v = config[k]
    if isinstance(v, ml_collections.ConfigDict):
      out += _flat_keys(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def check_override(config, dotted: str, raw: str | None, *, flag: str) -> None:
  """Raise `InputError` unless ``dotted`` is a field of ``config`` and ``raw`` (None: unchecked) fits its type."""
  import ml_collections
  node, parts = config, dotted.split(".")
  for depth, part in enumerate(parts):
    section = ".".join(["config"] + parts[:depth])
    if not isinstance(node, ml_collections.ConfigDict):
      raise InputError(f"{flag}: {section} is a value, not a section (set {flag.split('=')[0].lstrip('-')} "
                       f"without the trailing .{'.'.join(parts[depth:])}).")
    if part not in node:
      hint = close_matches(part, node.keys()) or close_matches(dotted, _flat_keys(config))
      raise InputError(f"{flag}: {section} has no key {part!r}.{hint} Its keys: {', '.join(sorted(node.keys()))}.")
    node = node[part]
  if raw is None or node is None:
    return
  kind = type(node)
  try:
    if kind is bool:
      if raw.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(raw)
    elif kind is int:
      int(raw)
    elif kind is float:
      float(raw)
  except ValueError:
    article = "an" if kind is int else "a"
    raise InputError(f"{flag}: config.{dotted} is {article} {kind.__name__} (now {node!r}); {raw!r} is not.") from None


def check_config_argv(argv: Sequence[str], flag: str = "config") -> Any:
  """Load ``--<flag>=path[:args]`` and check every ``--<flag>.key=value`` of ``argv``; returns the config
  (None when the flag is absent: absl then reports a required flag)."""
  spec = _flag_value(argv, flag)
  if spec is None:
    return None
  path, _, _ = spec.partition(":")
  if not os.path.isfile(path):
    listed = available_configs()
    raise InputError(f"--{flag}={spec}: config file {path} does not exist. Available configs: "
                     f"{', '.join(listed) or '(none in ' + CONFIG_DIR + ')'}.")
  from lkjax import config_args
  try:
    config = config_args.load_config(spec)
  except ValueError as e:
    raise InputError(f"--{flag}={spec}: {e}") from None
  prefix = f"--{flag}."
  for i, a in enumerate(argv[1:], 1):
    a2 = "--" + a.lstrip("-") if a.startswith("-") else a
    if not a2.startswith(prefix):
      continue
    key, sep, raw = a2[len(prefix):].partition("=")
    if not sep:
      raw = argv[i + 1] if i + 1 < len(argv) else None
    check_override(config, key, raw, flag=a2 if sep else f"{prefix}{key}")
  return config


def check_target(value: str, flag: str = "--target") -> None:
  """A packaged target name or a Hugging Face model directory (config.json), else `InputError`."""
  from lkjax.targets.hf import PACKAGED
  if value in PACKAGED:
    return
  if not os.path.isdir(value):
    raise InputError(f"{flag}={value}: neither a packaged target ({', '.join(sorted(PACKAGED))}) nor a directory.")
  if not os.path.exists(os.path.join(value, "config.json")):
    raise InputError(f"{flag}={value}: not a Hugging Face model directory (no config.json); packaged targets: "
                     f"{', '.join(sorted(PACKAGED))}.")


def check_input_file(value: str | None, flag: str, what: str) -> None:
  """``value`` names an existing file, else `InputError` naming ``flag``."""
  if value and not os.path.isfile(value):
    raise InputError(f"{flag}={value}: no such file ({what}).")


def check_output_path(value: str, flag: str, *, directory: bool) -> None:
  """``value`` can be written as a directory (``directory``) or file: the wrong kind already there is an error."""
  if directory and os.path.exists(value) and not os.path.isdir(value):
    raise InputError(f"{flag}={value} is an existing file; pass a directory.")
  if not directory and os.path.isdir(value):
    raise InputError(f"{flag}={value} is a directory; pass a file path (e.g. {os.path.join(value, 'replies.jsonl')}).")


def check_positive(**values: int) -> None:
  """Each ``flag_name=value`` must be >= 1 (a usage error naming ``--flag_name`` otherwise)."""
  from absl import app

  for name, value in values.items():
    if value < 1:
      raise app.UsageError(f"--{name}={value}: must be >= 1")


def exactly_one(**values: Any) -> str:
  """The one ``flag_name=value`` that is set; a usage error naming every ``--flag_name`` when none or several are."""
  from absl import app

  given = [name for name, value in values.items() if value]
  if len(given) != 1:
    names = ["--" + n for n in values]
    raise app.UsageError(f"give exactly one of {', '.join(names[:-1])} and {names[-1]}"
                         + (f" (got {', '.join('--' + n for n in given)})" if given else ""))
  return given[0]


def report_error(e: BaseException) -> None:
  """Print a user-fixable error as one paragraph (the class name only where it adds information)."""
  msg = str(e).strip() or type(e).__name__
  if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
    msg = f"{e.filename}: {msg}"
  print(f"lkjax: error: {msg}\n(--verbosity=1 shows the traceback)", file=sys.stderr, flush=True)


def quiet_logs() -> None:
  """Third-party INFO (orbax per-save lines, jax's backend probing) off; lkjax prints its own lines."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)


def run(main: Callable[[list[str]], Any], *, config_flag: str | None = "config") -> None:
  """``absl.app.run(main)`` with `check_config_argv` first, quiet logs and one-paragraph errors."""
  from absl import app

  argv = list(sys.argv)
  user_verbosity = verbosity(argv)
  verbose = user_verbosity is not None and user_verbosity >= 1
  if config_flag:
    try:
      check_config_argv(argv, config_flag)
    except USER_ERRORS as e:
      if verbose:
        raise
      report_error(e)
      sys.exit(1)

  def guarded(args):
    if user_verbosity is None:
      quiet_logs()
    try:
      return main(args)
    except app.UsageError as e:  # absl would print the whole module docstring and every flag
      if verbose:
        raise
      print(f"lkjax: error: {e}\n(--helpshort lists the flags)", file=sys.stderr, flush=True)
      sys.exit(e.exitcode)
    except USER_ERRORS as e:
      if verbose:
        raise
      report_error(e)
      sys.exit(1)

  app.run(guarded)
