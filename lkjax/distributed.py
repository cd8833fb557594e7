"""Multi-process (multi-host) runs: the cluster variables, `jax.distributed` start-up, one config everywhere,
and a launcher of N local processes (``experiments/launch_local.py``).

A multi-process run is N copies of the same command, one per host (or, locally, per group of CPU devices),
that differ only in ``JAX_PROCESS_ID``. Variables read by `cluster_from_env`:

  JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator (every process connects to it)
  JAX_NUM_PROCESSES         N
  JAX_PROCESS_ID            this process, 0 .. N-1
  JAX_LOCAL_DEVICE_IDS      optional, jax's own: the local accelerators this process uses ("0,1")
  LKJAX_HEARTBEAT_TIMEOUT_S optional: seconds without a heartbeat after which a process counts as dead and
                            every other process stops with an error (default 100, jax's default)
  LKJAX_INIT_TIMEOUT_S      optional: seconds to wait for all N processes to connect (default 300)

(jax itself reads only the coordinator address; lkjax passes the rest to ``jax.distributed.initialize``.)
Under SLURM or Open MPI, with none of the JAX_* variables set, jax detects the cluster itself.

Cross-process collectives on CPU use gloo (``jax_cpu_collectives_implementation``), which lets a single
machine run N processes of ``--xla_force_host_platform_device_count`` CPU devices each: the same program a
cluster runs (one global mesh; each process feeds its own rows, `lkjax.sharding.global_batch_from_local`).

When a process dies, the others notice the missing heartbeats within the heartbeat timeout and end with
"Terminating process because the JAX distributed service detected fatal errors" (status 134 after jax's
fatal log); relaunching the same command resumes from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Mapping, Sequence, TextIO

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_HEARTBEAT = "LKJAX_HEARTBEAT_TIMEOUT_S"
ENV_INIT_TIMEOUT = "LKJAX_INIT_TIMEOUT_S"
# Cluster environments jax detects on its own (jax._src.clusters): SLURM and Open MPI.
_AUTO_DETECTED = {"SLURM_NTASKS": "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE": "OMPI_COMM_WORLD_RANK"}
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
DEFAULT_INIT_TIMEOUT_S = 300


class ConfigMismatchError(ValueError):
  """The processes of one run were started with different configs; ``keys`` are the differing dotted keys."""

  def __init__(self, keys: Sequence[str], values: Mapping[int, Mapping[str, Any]]):
    self.keys = list(keys)
    shown = []
    for key in self.keys[:5]:
      per = ", ".join(f"process {p}: {v.get(key, '<missing>')!r}" for p, v in sorted(values.items()))
      shown.append(f"config.{key} ({per})")
    more = f" and {len(self.keys) - 5} more" if len(self.keys) > 5 else ""
    super().__init__(f"the processes of this run have different configs: {'; '.join(shown)}{more}. Start every "
                     "process with the same --config and --config.* flags.")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """One process's view of a run of ``num_processes`` processes."""

  coordinator_address: str
  num_processes: int
  process_id: int
  heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S
  init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S


def _int_var(env: Mapping[str, str], name: str, default: int | None = None, *, minimum: int) -> int:
  raw = env.get(name)
  if raw is None or raw == "":
    if default is None:
      raise ValueError(f"{name} is not set")
    return default
  try:
    value = int(raw)
  except ValueError:
    raise ValueError(f"{name}={raw!r}: not an integer") from None
  if value < minimum:
    raise ValueError(f"{name}={value}: must be >= {minimum}")
  return value


def cluster_from_env(env: Mapping[str, str] | None = None) -> ClusterSpec | None:
  """The `ClusterSpec` of the JAX_* variables above; None when none of them is set.

  Raises:
    ValueError: naming the variable that is missing (some but not all are set) or malformed.
  """
  env = os.environ if env is None else env
  names = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
  present = [n for n in names if env.get(n)]
  if not present:
    return None
  missing = [n for n in names if n not in present]
  if missing:
    raise ValueError(f"multi-process run: {', '.join(present)} set but {', '.join(missing)} not; set all of "
                     f"{', '.join(names)} (the same on every process except {ENV_PROCESS_ID}).")
  address = env[ENV_COORDINATOR]
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"{ENV_COORDINATOR}={address!r}: expected host:port (process 0's host and a free port)")
  n = _int_var(env, ENV_NUM_PROCESSES, minimum=1)
  pid = _int_var(env, ENV_PROCESS_ID, minimum=0)
  if pid >= n:
    raise ValueError(f"{ENV_PROCESS_ID}={pid}: must be < {ENV_NUM_PROCESSES}={n}")
  return ClusterSpec(coordinator_address=address, num_processes=n, process_id=pid,
                     heartbeat_timeout_s=_int_var(env, ENV_HEARTBEAT, DEFAULT_HEARTBEAT_TIMEOUT_S, minimum=1),
                     init_timeout_s=_int_var(env, ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT_S, minimum=1))


def in_cluster(env: Mapping[str, str] | None = None) -> bool:
  """Whether this process belongs to a multi-process run (JAX_* variables, SLURM or Open MPI)."""
  env = os.environ if env is None else env
  spec = cluster_from_env(env)
  if spec is not None:
    return spec.num_processes > 1
  return any(int(env.get(size, "1") or 1) > 1 for size in _AUTO_DETECTED)


def process_id_from_env(env: Mapping[str, str] | None = None) -> int:
  """This process's id from the environment alone (0 outside a cluster), without starting jax.distributed."""
  env = os.environ if env is None else env
  spec = cluster_from_env(env)
  if spec is not None:
    return spec.process_id
  for size, rank in _AUTO_DETECTED.items():
    if env.get(size):
      return int(env.get(rank, "0") or 0)
  return 0


def main_process_only(what: str, env: Mapping[str, str] | None = None) -> bool:
  """Whether this process should do ``what`` (evaluation, export: work whose outputs are files, done once).

  True outside a multi-process run and on process 0; on any other process prints that it leaves ``what``
  to process 0 and returns False (the entry script then exits successfully without writing anything).
  """
  pid = process_id_from_env(env)
  if pid == 0:
    return True
  print(f"[lkjax] {what} runs on process 0 only; process {pid} has nothing to do", flush=True)
  return False


def initialize(env: Mapping[str, str] | None = None) -> ClusterSpec | None:
  """Start `jax.distributed` when this process is part of a multi-process run; returns its spec (None when
  the run is single-process or jax detected the cluster itself). Must run before any jax computation."""
  import jax
  env = os.environ if env is None else env
  spec = cluster_from_env(env)
  if spec is None:
    if in_cluster(env):
      jax.distributed.initialize()   # SLURM / Open MPI: jax reads the cluster's own variables
    return None
  # gloo is jax's default for CPU collectives; set explicitly so a CPU-only cluster does not depend on it.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                             process_id=spec.process_id, initialization_timeout=spec.init_timeout_s,
                             heartbeat_timeout_seconds=spec.heartbeat_timeout_s,
                             cluster_detection_method="deactivate")
  return spec


@contextlib.contextmanager
def exit_at_once_on_error():
  """Around the work of a multi-process run: an exception ends this process at once (status 1, after
  printing the error) instead of letting Python's exit wait in jax's shutdown barrier for processes that
  are themselves blocked in a collective waiting for this one -- they would hang until the shutdown timeout
  (300 s). Gone at once, this process stops sending heartbeats and the others stop within the heartbeat
  timeout. Single-process runs (and a successful ``SystemExit``) pass through unchanged."""
  try:
    yield
  except BaseException as e:  # noqa: BLE001 -- every failure must end the process
    import jax
    if not jax.distributed.is_initialized() or (isinstance(e, SystemExit) and not e.code):
      raise
    from lkjax import cli
    if isinstance(e, cli.USER_ERRORS):
      cli.report_error(e)
    else:
      traceback.print_exc()
    print(f"[lkjax] process {jax.process_index()} of {jax.process_count()} failed; ending it now so that the "
          "other processes stop too (rerun the same command on every process to resume)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


# ----------------------------------------------------------------------------------------------- config check


def flat_config(config) -> dict[str, Any]:
  """``{"optim.lr": 4e-4, ...}``: the config's leaves under dotted keys, JSON-normalised (tuples -> lists)."""
  tree = json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(json.dumps(config))

  def walk(node, prefix):
    if isinstance(node, dict):
      for k in sorted(node):
        yield from walk(node[k], f"{prefix}{k}.")
    else:
      yield prefix[:-1], node

  return dict(walk(tree, ""))


def config_fingerprint(config) -> str:
  """sha256 of the config's canonical JSON (equal configs, equal fingerprints)."""
  return hashlib.sha256(json.dumps(flat_config(config), sort_keys=True).encode()).hexdigest()


def differing_keys(configs: Mapping[int, Mapping[str, Any]]) -> list[str]:
  """Dotted keys whose value is not the same in every process's flat config (missing counts as differing)."""
  keys = sorted(set().union(*(c.keys() for c in configs.values())))
  return [k for k in keys if len({json.dumps(c.get(k, "<missing>"), sort_keys=True) for c in configs.values()}) > 1]


def _allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's ``data`` (a collective: all processes must call it)."""
  import numpy as np
  from jax.experimental import multihost_utils
  lengths = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
  buf = np.zeros(int(lengths.max()), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), -1)
  return [rows[i, :int(n)].tobytes() for i, n in enumerate(lengths)]


def check_same_config(config) -> str:
  """Compare the config of every process of the run (a collective); returns the shared fingerprint.

  Raises:
    ConfigMismatchError: on every process, naming each differing key and its value per process.
  """
  import jax
  fingerprint = config_fingerprint(config)
  if jax.process_count() == 1:
    return fingerprint
  mine = json.dumps(dict(fingerprint=fingerprint, config=flat_config(config)), sort_keys=True).encode()
  gathered = {p: json.loads(b) for p, b in enumerate(_allgather_bytes(mine))}
  if len({g["fingerprint"] for g in gathered.values()}) > 1:
    values = {p: g["config"] for p, g in gathered.items()}
    raise ConfigMismatchError(differing_keys(values), values)
  return fingerprint


# ----------------------------------------------------------------------------------------------- local launch


def free_port() -> int:
  """A TCP port free on this machine now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def local_process_env(process_id: int, num_processes: int, port: int, *, devices_per_process: int,
                      heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
                      init_timeout_s: int = DEFAULT_INIT_TIMEOUT_S,
                      base: Mapping[str, str] | None = None) -> dict[str, str]:
  """The environment of local process ``process_id``: the cluster variables, CPU platform and
  ``devices_per_process`` CPU devices (any device-count flag in ``base``'s XLA_FLAGS is replaced)."""
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env.update({
      ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(process_id),
      ENV_HEARTBEAT: str(heartbeat_timeout_s), ENV_INIT_TIMEOUT: str(init_timeout_s),
      "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices_per_process),
      "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
      "PYTHONUNBUFFERED": "1",
  })
  return env


@dataclasses.dataclass
class ProcessExit:
  """How one launched process ended: ``returncode`` (negative: killed by that signal), ``seconds`` after the
  launch, and whether the launcher had to stop it (``stopped_by_launcher``)."""

  process_id: int
  returncode: int
  seconds: float
  stopped_by_launcher: bool = False

  def describe(self) -> str:
    rc = self.returncode
    if rc in (-signal.SIGABRT, 128 + signal.SIGABRT):
      how = "aborted by jax's distributed runtime (it saw another process fail; see its log)"
    elif rc < 0:
      how = f"killed by {signal.Signals(-rc).name}"
    else:
      how = f"exit status {rc}"
    who = ", stopped by the launcher" if self.stopped_by_launcher else ""
    return f"process {self.process_id}: {how} after {self.seconds:.1f} s{who}"


@dataclasses.dataclass
class LaunchResult:
  exits: list[ProcessExit]
  first_failure: ProcessExit | None

  @property
  def returncode(self) -> int:
    """0 if every process succeeded, else the first failing process's status (1 for a signal)."""
    if self.first_failure is None:
      return 0
    return self.first_failure.returncode if self.first_failure.returncode > 0 else 1

  def summary(self) -> str:
    if self.first_failure is None:
      return f"[launch] all {len(self.exits)} processes finished"
    lines = [f"[launch] process {self.first_failure.process_id} failed first; how each process ended:"]
    lines += [f"  {e.describe()}" for e in sorted(self.exits, key=lambda e: e.seconds)]
    return "\n".join(lines)


def _pump(stream, out: TextIO, prefix: str, log: TextIO | None) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()
    if log is not None:
      log.write(line)
      log.flush()
  stream.close()


def launch_local(command: Sequence[str], *, num_processes: int, devices_per_process: int, port: int = 0,
                 heartbeat_timeout_s: int = 30, init_timeout_s: int = 120, grace_s: float | None = None,
                 log_dir: str | os.PathLike | None = None, out: TextIO | None = None, cwd: str | None = None,
                 on_start=None) -> LaunchResult:
  """Run ``command`` as ``num_processes`` local processes of one multi-process jax run and wait for them.

  Each process gets `local_process_env` (a shared coordinator on 127.0.0.1:``port``, 0: a free one).
  Output lines are prefixed ``[p<i>] `` on ``out`` (default stdout) and, with ``log_dir``, also written to
  ``<log_dir>/process_<i>.log``. When one process fails, the others are expected to end on their own within
  the heartbeat timeout; any still running ``grace_s`` seconds later (default: heartbeat timeout + 30 s) is
  stopped (SIGTERM, then SIGKILL) and reported as stopped by the launcher. ``on_start(popens)`` is called
  once the processes run (tests use it to inject faults).
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes={num_processes}, devices_per_process={devices_per_process}: must be >= 1")
  out = sys.stdout if out is None else out
  port = port or free_port()
  grace_s = heartbeat_timeout_s + 30.0 if grace_s is None else grace_s
  logs = []
  if log_dir is not None:
    os.makedirs(log_dir, exist_ok=True)
    logs = [open(os.path.join(log_dir, f"process_{i}.log"), "w") for i in range(num_processes)]
  t0 = time.monotonic()
  procs, pumps = [], []
  try:
    for i in range(num_processes):
      env = local_process_env(i, num_processes, port, devices_per_process=devices_per_process,
                              heartbeat_timeout_s=heartbeat_timeout_s, init_timeout_s=init_timeout_s)
      p = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, errors="replace")
      procs.append(p)
      th = threading.Thread(target=_pump, args=(p.stdout, out, f"[p{i}] ", logs[i] if logs else None), daemon=True)
      th.start()
      pumps.append(th)
    if on_start is not None:
      on_start(procs)
    exits: dict[int, ProcessExit] = {}
    first: ProcessExit | None = None
    stopping: set[int] = set()
    while len(exits) < num_processes:
      for i, p in enumerate(procs):
        if i not in exits and p.poll() is not None:
          exits[i] = ProcessExit(i, p.returncode, time.monotonic() - t0, stopped_by_launcher=i in stopping)
          if p.returncode != 0 and first is None:
            first = exits[i]
      if first is not None and time.monotonic() - t0 > first.seconds + grace_s:
        for i, p in enumerate(procs):
          if i not in exits and i not in stopping:
            stopping.add(i)
            p.terminate()
        if time.monotonic() - t0 > first.seconds + grace_s + 10:
          for i, p in enumerate(procs):
            if i not in exits:
              p.kill()
      time.sleep(0.05)
    for th in pumps:
      th.join(timeout=5)
    result = LaunchResult(exits=[exits[i] for i in range(num_processes)], first_failure=first)
    out.write(result.summary() + "\n")
    out.flush()
    return result
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs:
      f.close()
