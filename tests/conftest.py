"""Test setup: 8 CPU devices and parsed absl flags, before anything imports jax; the shared helpers
(tests/draft_testing.py) and every area's test modules importable from every area folder."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Test modules share fixtures across areas (e.g. `from test_targets import make_target`): every area folder
# is importable, whatever order pytest collects them in.
for _d in sorted(os.listdir(_HERE)):
  if os.path.isdir(os.path.join(_HERE, _d)) and not _d.startswith(("_", ".")):
    sys.path.insert(0, os.path.join(_HERE, _d))
sys.path.insert(0, _HERE)

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the XLA_FLAGS line)

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

# grain worker processes read absl flags; outside absl.app.run they must be marked parsed.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
