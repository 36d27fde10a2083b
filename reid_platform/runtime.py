"""Process and cluster runtime shared by every job: Ray start-up, worker environment, devices.

Training, evaluation, the gallery build, the service, sweeps and benchmarks all start Ray and
pick devices the same way, through this module (it sits below every other package).

- `init_ray`: join `$RAY_ADDRESS`, or start a fresh local Ray that listens on 127.0.0.1 only.
- `WORKER_ENV`: environment variables every Ray worker needs.
- `resolve_device`: "auto" | "cpu" | "cuda" | "cuda:N" -> a torch device, with a clear error.
- `cluster_gpus`, `gpus_per_actor`: how many GPUs Ray has, and what an actor should ask for.
- `amp_enabled`, `amp_dtype`: whether mixed precision is on for a setting ("auto", "on",
  "fp16", "bf16", "off") and device, and in which dtype.
- The console: a job prints our own lines (`[train] ...`, `[tune] ...`) and results; what Ray
  itself prints (its logs, every worker's log lines, warnings) goes to a log file, named at
  start-up. `--verbose` on a job (or `REID_PLATFORM_VERBOSE=1`) shows everything.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

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


VERBOSE_ENV = "REID_PLATFORM_VERBOSE"
# Lines our own code prints in Ray workers; the console shows these and hides the rest.
OUR_PREFIXES = ("[train]", "[tune]", "[data]", "[eval]", "[index]", "[pseudo]", "[serve]",
                "[ray]")


def verbose() -> bool:
    """Whether Ray's own output is shown on the console (`--verbose`)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure_console(show_all: bool = False) -> None:
    """Set up the console of a job before its libraries load: quiet (our lines, warnings and
    errors) by default, everything with `show_all` (the jobs' `--verbose`)."""
    if show_all:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    # MLflow's own "Downloading artifacts" bars (registering and loading models)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # MLflow's schema migrations


def init_ray(num_cpus: int | None = None, log_file: str | Path | None = None) -> None:
    """Connect to $RAY_ADDRESS, or start a new local Ray listening on 127.0.0.1 only.

    Loopback comes from the switch set in `reid_platform/__init__.py` (Ray ignores a
    127.0.0.1 `_node_ip_address` and advertises the outward IP instead).

    Ray's State API (which Ray Train's placement-group cleaner calls from inside the
    cluster) finds "its" cluster by scanning the host, and fails where several Ray instances
    run on one machine: every process of ours is told the address of its own cluster.

    Args:
        num_cpus: CPUs of a new local Ray (None = the machine's); ignored when joining.
        log_file: where Ray's own output goes (unless `verbose()`); None = Ray's session
            folder only.
    """
    import ray

    if ray.is_initialized():
        return
    quiet = not verbose()
    if quiet:
        _quiet_ray_logger(log_file)
    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        print(f"[ray] joining the Ray cluster at {address} ...", flush=True)
        env = {**WORKER_ENV, "RAY_ADDRESS": address}
        context = ray.init(runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        cpus = num_cpus or os.cpu_count() or 1
        print(f"[ray] starting a local Ray ({cpus} CPUs, on 127.0.0.1 only) ...", flush=True)
        own_api_server = API_SERVER_ENV not in os.environ
        for attempt in range(3):
            port = loopback_port(DASHBOARD_PORT)
            api_server = f"http://127.0.0.1:{port}"
            if own_api_server:
                os.environ[API_SERVER_ENV] = api_server
            try:
                # address="local": a fresh instance even if `ray start` left a cluster
                # running (plain ray.init() would join it, and then refuse num_cpus).
                context = ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=port,
                    runtime_env={"env_vars": {**WORKER_ENV, API_SERVER_ENV: api_server}},
                    log_to_driver=True,
                )
                break
            except Exception as err:
                # another Ray starting on this machine took the port between our check
                # and the dashboard's bind: try a fresh one
                if "valid port for dashboard" not in str(err) or attempt == 2:
                    raise
                ray.shutdown()
    if quiet:
        _route_worker_output(log_file)
    dashboard = getattr(context, "dashboard_url", "") or ""
    where = f"; Ray's own messages: {log_file}" if quiet and log_file else ""
    print(f"[ray] cluster {ray.get_runtime_context().gcs_address}"
          + (f", dashboard http://{dashboard}" if dashboard else "") + where, flush=True)
    _warm_up_train_coordinator()


def _warm_up_train_coordinator() -> None:
    """Start Ray Train's AutoscalingCoordinator actor now and wait until it is up.

    Ray Train's controller asks it for resources with a 5 s timeout; created lazily, a new
    actor process on a busy small machine takes longer than that, and the controller prints
    a GetTimeoutError traceback (harmless, but a successful run then looks broken).
    """
    import ray

    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=120)
    except Exception as err:  # noqa: BLE001 - best effort: Train works without it
        logging.getLogger(__name__).warning("could not start Ray Train's coordinator: %s", err)


class _RayOutput:
    """Ray's driver-side printer of worker output, filtered: lines our code prints go to the
    console, everything (with Ray's `(Actor pid=...)` prefix) goes to the log file."""

    def __init__(self, log: TextIO | None):
        self.log = log
        self.lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> None:
        from ray._private.worker import print_to_stdstream
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        lines = data.get("lines", [])
        ours = [ln for ln in lines if ln.startswith(OUR_PREFIXES) or RAY_TQDM_MAGIC in ln]
        if ours:  # Ray's own printer draws progress bars (tqdm_ray) and our lines
            print_to_stdstream({**data, "lines": ours}, ignore_prefix=True)
        if self.log is not None:
            name = data.get("actor_name") or data.get("task_name") or ""
            prefix = f"({name} pid={data.get('pid')}) "
            with self.lock:
                self.log.writelines(prefix + ln + "\n" for ln in lines
                                    if RAY_TQDM_MAGIC not in ln)
                self.log.flush()


def _open_log(log_file: str | Path | None) -> TextIO | None:
    if log_file is None:
        return None
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("a", buffering=1)


def _quiet_ray_logger(log_file: str | Path | None) -> None:
    """Ray's logger in this process: its info and warnings (token auth, start-up banner) to
    the log file, only errors on the console."""
    logger = logging.getLogger("ray")
    for handler in logger.handlers:
        if getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
            handler.setLevel(logging.ERROR)
    log = _open_log(log_file)
    if log is not None:
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
        logger.addHandler(handler)


def _route_worker_output(log_file: str | Path | None) -> None:
    from ray._private.worker import global_worker_stdstream_dispatcher

    global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    global_worker_stdstream_dispatcher.add_handler("ray_print_logs",
                                                   _RayOutput(_open_log(log_file)))


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
    """Mixed precision for `train.amp`: "on"/"fp16", "bf16", "off", or "auto" = fp16 when on
    a CUDA device."""
    return setting in ("on", "fp16", "bf16") or (setting == "auto" and device.type == "cuda")


def amp_dtype(setting: str) -> torch.dtype:
    """The autocast dtype of `train.amp`: bfloat16 for "bf16", else float16. bf16 has fp32's
    exponent range, so it trains without a GradScaler; fp16 needs one."""
    import torch

    return torch.bfloat16 if setting == "bf16" else torch.float16


def process_cpus() -> int:
    """CPUs this process should use for its compute threads (at least 1).

    Inside a Ray actor or task: its CPU share, rounded down (a replica given 1.5 CPUs runs 1
    thread: more would oversubscribe the node Ray packed it onto). Elsewhere: the CPUs the
    process may run on (its affinity, which containers and `taskset` narrow).
    """
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            if context.get_actor_id() is not None or context.worker.mode == ray.WORKER_MODE:
                share = context.get_assigned_resources().get("CPU", 0.0)
                if share > 0:
                    return max(1, int(share))
    except Exception:  # noqa: BLE001  (a driver without Ray, or an older Ray API)
        pass
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
