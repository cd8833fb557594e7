"""big_vision-style config arguments and config-file loading.

A config file is ``get_config(arg=None) -> ConfigDict`` where ``arg`` is the string after the colon in
``--config=configs/eagle3.py:loss=lk_hybrid,eta=3,smoke``. `parse_arg` turns that string into a
ConfigDict: ``key=value`` pairs, a bare ``key`` means ``key=True``; each value is cast to the type of the
key's default, and an unknown key is an error (so a typo never silently runs the wrong experiment).

`load_config` loads a config file the way ``config_flags.DEFINE_config_file`` does (path, optional
``:arg``) and applies dotted overrides (``{"loss.eta": 10}``), rejecting unknown keys -- used by
``experiments/sweep.py``, the tests and `lkjax.train.loop.load_trained_draft`.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any, Mapping

import ml_collections

_TRUE = {"1", "true", "yes", "on", ""}
_FALSE = {"0", "false", "no", "off"}


def _cast(key: str, raw: str, default: Any) -> Any:
  if isinstance(default, bool):
    low = raw.strip().lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f"config arg {key!r}: {raw!r} is not a boolean")
  try:
    if isinstance(default, int):
      return int(raw)
    if isinstance(default, float):
      return float(raw)
  except ValueError as e:
    raise ValueError(f"config arg {key!r}: {raw!r} is not a {type(default).__name__}") from e
  return raw


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parse ``"a=1,b,c=x"`` against defaults ``spec`` -> ConfigDict of all keys in ``spec``.

  A bare word sets a boolean (``smoke`` -> ``smoke=True``); values take the type of their default.
  Raises ValueError naming the key for unknown keys, duplicates, or values of the wrong type.
  """
  out = dict(spec)
  seen = set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in spec:
      near = difflib.get_close_matches(key, list(spec), n=3)
      hint = f" Did you mean: {', '.join(near)}?" if near else ""
      raise ValueError(f"config arg: unknown key {key!r} in {arg!r}.{hint} Known keys: {', '.join(sorted(spec))}.")
    if key in seen:
      raise ValueError(f"config arg: key {key!r} given twice in {arg!r}")
    seen.add(key)
    if not sep:
      if not isinstance(spec[key], bool):
        raise ValueError(f"config arg {key!r}: needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _cast(key, raw, spec[key])
  return ml_collections.ConfigDict(out)


def _load_module(path: str, name: str | None = None):
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  name = name or "lkjax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def import_sibling(file: str, name: str):
  """Import ``name.py`` from the directory of ``file`` (configs/ is a folder of files, not a package)."""
  return _load_module(os.path.join(os.path.dirname(os.path.abspath(file)), name + ".py"),
                      name="lkjax_config_" + name)


def load_config_module(spec: str):
  """``"configs/eagle3.py:smoke"`` -> (module, arg or None)."""
  path, _, arg = spec.partition(":")
  return _load_module(path), (arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Set dotted keys (``{"loss.eta": 10}``) on a copy of ``config``; unknown keys raise ValueError."""
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked deep copy
  for dotted, value in overrides.items():
    node = config
    parts = dotted.split(".")
    for p in parts[:-1]:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise ValueError(f"config override {dotted!r}: {p!r} is not a config section")
      node = node[p]
    if parts[-1] not in node:
      near = difflib.get_close_matches(parts[-1], list(node.keys()), n=3)
      hint = f" Did you mean: {', '.join(near)}?" if near else ""
      raise ValueError(f"config override {dotted!r}: unknown key {parts[-1]!r}.{hint} "
                       f"Known: {', '.join(sorted(node.keys()))}.")
    old = node[parts[-1]]
    if isinstance(old, ml_collections.ConfigDict):
      raise ValueError(f"config override {dotted!r}: {parts[-1]!r} is a section, set its fields")
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if old is not None and value is not None and not isinstance(value, type(old)):
      raise ValueError(f"config override {dotted!r}: {value!r} is a {type(value).__name__}, "
                       f"expected {type(old).__name__}")
    node[parts[-1]] = value
  config.lock()
  return config


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Load ``path[:arg]`` like ``--config=path:arg`` and apply dotted ``overrides``."""
  module, arg = load_config_module(spec)
  config = module.get_config(arg)
  return apply_overrides(config, overrides or {})
