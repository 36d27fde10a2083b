"""Ray Serve applications of reid-platform: `python -m serve_apps run serve_apps/retrieval.yaml`."""

import reid_platform  # noqa: F401  (the loopback switch: before any app module imports ray)
