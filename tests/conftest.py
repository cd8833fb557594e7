"""Test setup: 8 CPU devices and parsed absl flags, before anything imports jax."""
import os

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
