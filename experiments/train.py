"""Train a draft model: ``python experiments/train.py --config=configs/eagle3.py``.

Flags: ``--config=configs/<arch>.py[:args]`` (see configs/base.py for the args), any ``--config.x=y``
override, ``--workdir`` (default ``runs/<config name>``; rerunning with the same workdir resumes).

On a fresh machine the default config prepares a small dataset with the packaged SmolLM2 target first
(``config.data.auto_prepare``). Multi-host (one process per host, each reading its own data share; the
variables are described in lkjax/distributed.py):

  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=<i> \\
      python experiments/train.py --config=configs/eagle3.py --workdir=/shared/run1

(``jax.distributed`` starts when these variables -- or a cluster environment JAX detects, SLURM or Open
MPI -- are present; the workdir and data must be on storage all hosts share.) On one machine,
``python experiments/launch_local.py --num_processes=2 --devices_per_process=4 -- experiments/train.py ...``
runs the same thing as N local processes.
"""
from __future__ import annotations

import os
import signal
import sys

# The repository root, so the entry point works from a plain checkout too (no pip install -e).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Training config file (configs/<arch>.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>). Resumes if it holds a checkpoint.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  from lkjax.train import loop
  config = FLAGS.config
  loop.validate_config(config)
  workdir = loop.check_workdir(FLAGS.workdir or os.path.join("runs", config.name))
  from lkjax import distributed
  distributed.initialize()  # multi-process runs only (the cluster variables are set)
  with distributed.exit_at_once_on_error():  # a failing process must not leave the others waiting
    summary = loop.train_and_evaluate(config, workdir)
  if summary.get("signal"):
    sys.exit(128 + int(getattr(signal, summary["signal"])))  # the shell's code for a signal-ended job


if __name__ == "__main__":
  from lkjax import cli
  cli.run(main)
