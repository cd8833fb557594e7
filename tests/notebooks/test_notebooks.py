"""The notebooks run top to bottom and are committed without outputs (see notebooks/README.md).

Each notebook is executed with nbclient in a kernel that runs THIS interpreter (a throw-away kernel spec
pointing at ``sys.executable``, so no kernel has to be registered and no other Python is picked up), with
``notebooks/`` as working directory, the repository on ``PYTHONPATH`` and a timeout per cell. Any cell error
-- including the notebooks' own assertions about their numbers -- fails the test with the cell's traceback.

``LKJAX_NOTEBOOK_OUT=<dir>`` keeps the executed copies (with plots) there for inspection.
``python tests/notebooks/test_notebooks.py --strip`` removes outputs from the committed notebooks in place.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = ["01_loss_landscape", "02_gradient_scaling", "03_lambda_schedules", "04_results"]
CELL_TIMEOUT_S = 300          # generous: CI machines are shared; each notebook takes < 1 minute alone
KERNEL_NAME = "lkjax-notebooks"


def _ids(paths):
  return [p.stem for p in paths]


def strip_outputs(nb) -> bool:
  """Remove outputs / execution counts in place; True if anything changed."""
  changed = False
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    if cell.get("outputs") or cell.get("execution_count") is not None:
      changed = True
    cell.outputs = []
    cell.execution_count = None
    for key in ("execution", "collapsed", "scrolled"):
      if cell.metadata.pop(key, None) is not None:
        changed = True
  if nb.metadata.pop("widgets", None) is not None:
    changed = True
  return changed


def test_all_notebooks_present():
  assert _ids(NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_outputs_stripped(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
  dirty = [i for i, c in enumerate(nb.cells)
           if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
  assert not dirty, (f"{path.name}: cells {dirty} have outputs; notebooks are committed stripped -- run "
                     f"`python tests/notebooks/test_notebooks.py --strip`")
  assert nb.cells[0].cell_type == "markdown", f"{path.name}: should open with a markdown cell saying what it shows"


def _kernel_manager(spec_dir: Path):
  """A KernelManager whose only kernel spec runs ``sys.executable``."""
  from jupyter_client import KernelManager
  from jupyter_client.kernelspec import KernelSpecManager
  kdir = spec_dir / KERNEL_NAME
  kdir.mkdir(parents=True, exist_ok=True)
  (kdir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "lkjax notebook test", "language": "python"}))
  ksm = KernelSpecManager(kernel_dirs=[str(spec_dir)], ensure_native_kernel=False)
  km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)
  assert km.kernel_spec.argv[0] == sys.executable
  return km


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path, tmp_path, monkeypatch):
  from nbclient import NotebookClient

  # The kernel inherits this environment: the repository importable, CPU jax, one host device (the
  # 8 forced devices of conftest are for the sharding tests), defaults instead of a user's own runs.
  pythonpath = os.environ.get("PYTHONPATH", "")
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + pythonpath if pythonpath else ""))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  monkeypatch.setenv("XLA_FLAGS", flags)
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # notebook 03's smoke run writes under tempfile.mkdtemp()
  for var in ("LKJAX_METRICS", "LKJAX_EVAL_JSON"):
    monkeypatch.delenv(var, raising=False)

  nb = nbformat.read(path, as_version=4)
  km = _kernel_manager(tmp_path / "kernels")
  client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                          resources={"metadata": {"path": str(NB_DIR)}})
  t0 = time.perf_counter()
  try:
    client.execute()
  finally:
    if km.has_kernel:  # nbclient leaves a kernel it did not create running
      km.shutdown_kernel(now=True)
    out_dir = os.environ.get("LKJAX_NOTEBOOK_OUT")
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
      nbformat.write(nb, os.path.join(out_dir, path.name))
  seconds = time.perf_counter() - t0
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors
  print(f"{path.name}: executed in {seconds:.1f} s")


# ------------------------------------------------------------------ lkjax.analysis (the notebooks' helpers)


def test_load_metrics_reads_the_trainers_writer(tmp_path):
  import numpy as np
  from lkjax import analysis
  from lkjax.train.metrics import MetricWriter
  w = MetricWriter(tmp_path, tensorboard=False)
  w.write(10, {"alpha": np.array([0.5, 0.25]), "lambda": np.array([0.2, 0.4]), "loss": 1.5})
  w.write(5, {"alpha": np.array([0.4, 0.2]), "loss": float("nan")})
  w.write(10, {"alpha": np.array([0.6, 0.3]), "loss": 1.0}, split="val")
  w.close()
  recs = analysis.load_metrics(tmp_path)               # a workdir
  assert [r["step"] for r in recs] == [r["step"] for r in analysis.load_metrics(tmp_path / "metrics.jsonl")]
  assert np.isnan(recs[1]["loss"])                      # the writer's "nan" string comes back as a float
  train = analysis.load_metrics(tmp_path, split="train")
  steps, alpha = analysis.head_traces(train, "alpha")
  np.testing.assert_array_equal(steps, [5, 10])         # sorted by step
  np.testing.assert_allclose(alpha, [[0.4, 0.2], [0.5, 0.25]])
  steps, lam = analysis.head_traces(train, "lambda")
  np.testing.assert_array_equal(steps, [10])
  assert analysis.num_heads(recs) == 2
  with pytest.raises(FileNotFoundError):
    analysis.load_metrics(tmp_path / "missing")
  (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
  with pytest.raises(ValueError, match="line 2"):
    analysis.load_metrics(tmp_path / "bad.jsonl")


def test_expand_paths_and_slopes(tmp_path):
  import numpy as np
  from lkjax import analysis
  for name in ("a/report.json", "b/report.json", "b/other.txt"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("{}")
  got = analysis.expand_paths(f"{tmp_path}/*/report.json, {tmp_path}/a/report.json, {tmp_path}/none.json")
  assert got == [str(tmp_path / "a/report.json"), str(tmp_path / "b/report.json")]
  x = np.array([1.0, 4.0, 16.0, 64.0])
  assert analysis.loglog_slope(x, 3.0 * x ** -0.5) == pytest.approx(-0.5)
  with pytest.raises(ValueError):
    analysis.loglog_slope(x, -x)
  np.testing.assert_allclose(analysis.lambda_of_alpha([0.0, 1.0], 3.0), [1.0, np.exp(-3.0)])


def _main(argv):
  if argv != ["--strip"]:
    print(__doc__)
    return 2
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    if strip_outputs(nb):
      nbformat.write(nb, path)
      print("stripped", path.relative_to(ROOT))
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
