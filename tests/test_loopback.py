"""Loopback for every entry point that starts a local Ray: the switch holds even when Ray was
imported first (what Ray's `serve run module:build_app` does), and `python -m serve_apps`
(Ray's serve CLI for config files) sets it before Ray is imported. No Ray is started here;
test_serve.py lists the listening sockets of live apps."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, **env: str) -> str:
    """`code` in a fresh interpreter without the loopback switch or RAY_ADDRESS."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")
    }
    clean.update(env)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


NODE_IP = "from ray._private.services import get_node_ip_address; print(get_node_ip_address())"


def test_ray_imported_first_still_gets_loopback():
    # Without the project, this machine's Ray would advertise its outward address.
    before, after = run_python(
        f"import ray\n{NODE_IP}\nimport serve_apps.retrieval\n{NODE_IP}"
    ).split()
    assert after == "127.0.0.1"
    if before == "127.0.0.1":
        pytest.skip("this machine has no outward address: the test cannot fail here")


def test_serve_cli_wrapper_sets_the_switch_before_ray():
    out = run_python(
        "import sys, serve_apps.__main__\n"
        "import ray._private.ray_constants as c, os\n"
        "print(c.ENABLE_RAY_CLUSTER, os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'])"
    )
    assert out == "False 0"


def test_cluster_address_and_opt_out_leave_ray_alone():
    code = "import reid_platform, os; print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'))"
    assert run_python(code, RAY_ADDRESS="ray://10.0.0.1:10001") == "None"
    assert run_python(code, REID_PLATFORM_LOOPBACK="0") == "None"
    assert run_python(code) == "0"
