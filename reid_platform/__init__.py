"""reid-platform: train, tune, evaluate and serve re-identification embedding models on Ray."""

import os
import sys

# A local Ray (no RAY_ADDRESS) must listen on loopback only. Ray turns a 127.0.0.1 node address
# into the machine's outward IP, and Ray Train then uses that as the DDP MASTER_ADDR. Ray reads
# this switch once, when `ray` is first imported, which is why it is set here, at the top of
# every entry point's first import. A cluster (RAY_ADDRESS set, other than "local") is left
# alone; set REID_PLATFORM_LOOPBACK=0 to opt out locally.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_wanted() -> bool:
    opted_out = os.environ.get("REID_PLATFORM_LOOPBACK", "1") == "0"
    return os.environ.get("RAY_ADDRESS", "") in ("", "local") and not opted_out


if _loopback_wanted():
    os.environ.setdefault(LOOPBACK_ENV, "0")
    # An entry point that imported Ray before this package (`serve run module:build_app`, a
    # notebook) has already read the switch; Ray looks the constant up at every node-address
    # lookup, so setting it still keeps a Ray started later in this process on loopback. The
    # variable above reaches the processes that Ray starts (GCS, raylet, workers).
    _constants = sys.modules.get("ray._private.ray_constants")
    if _constants is not None and os.environ[LOOPBACK_ENV] == "0":
        _constants.ENABLE_RAY_CLUSTER = False
