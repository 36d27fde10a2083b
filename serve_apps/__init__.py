"""Ray Serve applications of reid-platform (`serve run serve_apps/retrieval.yaml`)."""
