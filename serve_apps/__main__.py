"""Ray's `serve` command line with the loopback switch set before Ray is imported.

    python -m serve_apps run serve_apps/retrieval.yaml
    python -m serve_apps run serve_apps.retrieval:build_app index_dir=~/reid-platform/index
    python -m serve_apps deploy serve_apps/retrieval.yaml
    python -m serve_apps status

The same subcommands and options as `serve` (it is Ray's own CLI). The difference is the
order: `serve run CONFIG.yaml` imports Ray and starts a local Ray instance before any code of
this project runs, so Ray's "listen on the outward IP" default wins unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is already in the environment. Importing `reid_platform`
first sets it (not when RAY_ADDRESS names a cluster, or with REID_PLATFORM_LOOPBACK=0).
"""

import reid_platform  # noqa: F401  (the loopback switch, before ray is imported)


def main() -> None:
    from ray.serve.scripts import cli

    cli(prog_name="python -m serve_apps")


if __name__ == "__main__":
    main()
