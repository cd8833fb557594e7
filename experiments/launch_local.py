"""Run a multi-host job on one machine: N local processes, each with its own CPU devices, one jax run.

  python experiments/launch_local.py --num_processes=2 --devices_per_process=4 -- \\
      experiments/train.py --config=configs/eagle3.py --workdir=runs/eagle3_2proc

Every process runs the command after ``--`` (a ``.py`` file runs with this Python) with the variables a
cluster sets on each host (lkjax/distributed.py): ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, plus ``JAX_PLATFORMS=cpu`` and ``--devices_per_process`` CPU
devices; cross-process collectives go through gloo. Output lines carry a ``[p<i>]`` prefix (and go to
``<log_dir>/process_<i>.log`` with ``--log_dir``). If a process fails, the others end on their own within
``--heartbeat_timeout_s``; the launcher stops any left after a grace period, reports how each process ended,
and exits with the first failure's status. Rerunning a train command resumes from its last checkpoint.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_integer("num_processes", 2, "Number of local processes.")
flags.DEFINE_integer("devices_per_process", 4, "CPU devices of each process.")
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free port).")
flags.DEFINE_integer("heartbeat_timeout_s", 30, "Seconds without a heartbeat before the others stop.")
flags.DEFINE_integer("init_timeout_s", 120, "Seconds to wait for every process to connect.")
flags.DEFINE_float("grace_s", None, "Seconds after the first failure before the launcher stops the rest "
                   "(default: heartbeat timeout + 30).")
flags.DEFINE_string("logs", None, "Also write each process's output to <logs>/process_<i>.log.")
FLAGS = flags.FLAGS


def main(argv):
  command = argv[1:]
  if command and command[0] == "--":
    command = command[1:]
  if not command:
    raise app.UsageError("give the command to run after --, e.g. -- experiments/train.py --config=configs/eagle3.py")
  from lkjax import cli, distributed
  cli.check_positive(num_processes=FLAGS.num_processes, devices_per_process=FLAGS.devices_per_process,
                     heartbeat_timeout_s=FLAGS.heartbeat_timeout_s, init_timeout_s=FLAGS.init_timeout_s)
  if command[0].endswith(".py"):
    command = [sys.executable] + command
  result = distributed.launch_local(command, num_processes=FLAGS.num_processes,
                                    devices_per_process=FLAGS.devices_per_process, port=FLAGS.port,
                                    heartbeat_timeout_s=FLAGS.heartbeat_timeout_s,
                                    init_timeout_s=FLAGS.init_timeout_s, grace_s=FLAGS.grace_s,
                                    log_dir=FLAGS.logs)
  sys.exit(result.returncode)


if __name__ == "__main__":
  from lkjax import cli
  cli.run(main, config_flag=None)
