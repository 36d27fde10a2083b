"""Process and cluster runtime shared by every job: Ray start-up, worker environment, devices.

Training, evaluation, the gallery build, the service, sweeps and benchmarks all start Ray and
pick devices the same way, through this module (it sits below every other package).

- `init_ray`: join `$RAY_ADDRESS`, or start a fresh local Ray that listens on 127.0.0.1 only.
- `WORKER_ENV`: environment variables every Ray worker needs.
- `resolve_device`: "auto" | "cpu" | "cuda" | "cuda:N" -> a torch device, with a clear error.
- `cluster_gpus`, `gpus_per_actor`: how many GPUs Ray has, and what an actor should ask for.
- `amp_enabled`: whether mixed precision is on for a setting ("auto", "on", "off") and device.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Environment every Ray worker needs: albumentations otherwise checks for updates online;
# Train's print patch would echo every progress line twice (logger + tee to the real stdout).
WORKER_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "PYTHONUNBUFFERED": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


class DeviceError(ValueError):
    """A device setting names a device this machine does not have; the message names it."""


DASHBOARD_PORT = 8265  # Ray's default; a local Ray takes the next free one if it is busy
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to $RAY_ADDRESS, or start a new local Ray listening on 127.0.0.1 only.

    Loopback comes from the switch set in `reid_platform/__init__.py` (Ray ignores a
    127.0.0.1 `_node_ip_address` and advertises the outward IP instead).

    Ray's State API (which Ray Train's placement-group cleaner calls from inside the
    cluster) finds "its" cluster by scanning the host, and fails where several Ray instances
    run on one machine: every process of ours is told the address of its own cluster.

    Args:
        num_cpus: CPUs of a new local Ray (None = the machine's); ignored when joining.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        env = {**WORKER_ENV, "RAY_ADDRESS": os.environ["RAY_ADDRESS"]}
        ray.init(runtime_env={"env_vars": env}, log_to_driver=True)
        return
    port = loopback_port(DASHBOARD_PORT)
    api_server = f"http://127.0.0.1:{port}"
    os.environ.setdefault(API_SERVER_ENV, api_server)
    # address="local": a fresh instance even if `ray start` left a cluster running (plain
    # ray.init() would join it, and then refuse num_cpus).
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {**WORKER_ENV, API_SERVER_ENV: api_server}},
        log_to_driver=True,
    )


def loopback_port(preferred: int) -> int:
    """`preferred` if nothing listens on 127.0.0.1:preferred, else a free loopback port."""
    import socket

    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")


def resolve_device(device: str = "auto", flag: str = "--device") -> torch.device:
    """The torch device for a setting: "auto" = the first CUDA GPU when present, else the CPU.

    Args:
        device: "auto", "cpu", "cuda" or "cuda:N".
        flag: the option or config key the value came from, for the error message.

    Raises:
        DeviceError: an unknown device, or CUDA asked for where there is none.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DeviceError(f"{flag} {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"{flag} {device}: no CUDA GPU is available here")
    return resolved


def cluster_gpus() -> float:
    """GPUs in the Ray cluster now (0 on a CPU-only cluster); Ray must be initialised."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def gpus_per_actor(requested: float | None) -> float:
    """GPUs an inference actor (gallery embedder, service Embedder) asks for.

    Args:
        requested: an explicit count, or None = 1 when the cluster has GPUs, else 0.
    """
    if requested is not None:
        return float(requested)
    return 1.0 if cluster_gpus() > 0 else 0.0


def amp_enabled(setting: str, device: torch.device) -> bool:
    """Mixed precision for `train.amp`: "on", "off", or "auto" = on when on a CUDA device."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")
