"""reid-platform: train, tune, evaluate and serve re-identification embedding models on Ray."""

import os

# A local Ray (no RAY_ADDRESS) must listen on loopback only. Ray turns a 127.0.0.1 node address
# into the machine's outward IP, and Ray Train then uses that as the DDP MASTER_ADDR. Ray reads
# this switch once, when `ray` is first imported, which is why it is set here, at the top of
# every entry point's first import. A cluster (RAY_ADDRESS set) is left alone; set
# REID_PLATFORM_LOOPBACK=0 to opt out locally.
if not os.environ.get("RAY_ADDRESS") and os.environ.get("REID_PLATFORM_LOOPBACK", "1") != "0":
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
