"""ONNX export of any `ReidModel`, its parity check against PyTorch, and an ONNX Runtime embedder.

    checkpoint --load_model--> ReidModel.embed (eval mode)
        --torch.onnx.export (torch.export-based; the TorchScript exporter if that fails)-->
        ONNX graph   images (B, 3, H, W) float32 --> embeddings (B, D) float32, L2-normalised
                     B is a dynamic axis; the preprocessing contract is in the metadata
        [--fp16: weights and activations float16, the graph's input and output float32]
        --parity: the checkpoint's own query images through the eval transform, embedded by
                  PyTorch and by ONNX Runtime (batch 1 and one batch of the rest, sizes the
                  export never saw); max abs difference <= 1e-4 (fp32) or 5e-3 (fp16)
        --> model.onnx (or model.fp16.onnx) written atomically, beside the checkpoint by default

`OnnxEmbedder` runs the file with ONNX Runtime and has the call shape of the service's Embedder
and the gallery build: a normalised float32 batch (B, 3, H, W) in, float32 (B, D) unit rows
out. `ensure_onnx` returns an up-to-date export of a checkpoint, exporting it if there is none.

fp16 here means weights and activations in float16 with float32 input and output (the Cast
nodes are in the graph), converted by ONNX Runtime's own float16 tool. That is the precision
GPU execution providers (CUDA, TensorRT) run fast; ONNX Runtime's CPU provider has few float16
kernels and casts most nodes back to float32, so on CPU an fp16 file is half the size but not
faster (bench/onnx_runtime.py measures it). Its embeddings differ from PyTorch's by a few 1e-4
on random-init ResNets (measured in tests/test_export.py): the documented bound is 5e-3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reid_platform.checkpoint import checkpoint_file, load_model, read_checkpoint
from reid_platform.config import Config, ConfigError
from reid_platform.data.dataset import ImageDecodeError, read_image
from reid_platform.data.formats import DatasetError, Sample
from reid_platform.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform
from reid_platform.runtime import process_cpus

FORMAT = "reid-platform-onnx/1"
ONNX_FILE = "model.onnx"
ONNX_FP16_FILE = "model.fp16.onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
DEFAULT_OPSET = 18
FP32_ATOL = 1e-4  # max abs difference of unit-norm embeddings, PyTorch vs ONNX Runtime
FP16_ATOL = 5e-3
PARITY_IMAGES = 64
_EXAMPLE_BATCH = 2  # the batch traced at export; parity runs other sizes (1 and N-1)
_META_PREFIX = "reid_platform."


class ExportError(ValueError):
    """A model cannot be exported, or its export disagrees with PyTorch; the message says
    which model, file or setting, and why."""


class ParityDataError(ExportError):
    """The images for the parity check cannot be found or read."""


@dataclass(frozen=True)
class OnnxMetadata:
    """The contract an exported model carries in its ONNX `metadata_props`.

    A client that has only the .onnx file prepares its input from this: resize the RGB image
    (bilinear) to `input_height` x `input_width`, scale pixels by 1 / `pixel_scale`, subtract
    `mean` and divide by `std` per channel, lay it out NCHW, float32. The output is the
    `feature` side of the BNNeck, `embedding_dim` wide, L2-normalised: compare by dot product.

    Each field is stored under `reid_platform.<field>`: strings as they are, numbers and
    lists as JSON.
    """

    input_height: int
    input_width: int
    embedding_dim: int
    arch: str
    backbone: str
    config_digest: str  # `config_digest` of the checkpoint's config
    checkpoint_sha256: str  # of the checkpoint's model.pt: tells a stale export apart
    checkpoint_epoch: int
    precision: str  # "fp32" | "fp16" (weights and activations; input and output fp32)
    exporter: str  # "dynamo" (torch.export) | "torchscript"
    opset: int
    torch_version: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pixel_scale: float = 255.0
    channel_order: str = "RGB"
    layout: str = "NCHW"
    resize: str = "bilinear"
    feature: str = "post_bn"
    normalized: str = "l2"
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    parity_max_abs_diff: float = float("nan")  # filled in after the parity check
    parity_min_cosine: float = float("nan")
    parity_images: int = 0
    parity_atol: float = float("nan")
    format: str = FORMAT

    def to_props(self) -> dict[str, str]:
        """`metadata_props` entries: `reid_platform.<field>` -> string."""
        props = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            text = value if isinstance(value, str) else json.dumps(_plain(value))
            props[_META_PREFIX + item.name] = text
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "model") -> OnnxMetadata:
        """Parse `to_props` output (extra keys are ignored).

        Raises:
            ExportError: the file was not exported by reid-platform, or a field is missing.
        """
        if props.get(_META_PREFIX + "format") != FORMAT:
            raise ExportError(
                f"{source}: not an ONNX model exported by reid-platform (metadata "
                f"{_META_PREFIX}format={props.get(_META_PREFIX + 'format')!r}, expected "
                f"{FORMAT!r}); export it with jobs/export.py"
            )
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            key = _META_PREFIX + item.name
            if key not in props:
                if item.default is dataclasses.MISSING:
                    raise ExportError(f"{source}: metadata {key} is missing")
                continue
            text = props[key]
            if isinstance(item.default, str) or item.type == "str":
                values[item.name] = text
            else:
                value = json.loads(text)
                if value is None and item.type == "float":
                    value = float("nan")
                values[item.name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [float(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN; a missing parity number reads back as None
    return value


@dataclass(frozen=True)
class ParityReport:
    """PyTorch vs ONNX Runtime embeddings of the same images.

    Attributes:
        max_abs_diff: largest absolute difference of any embedding component.
        min_cosine: smallest cosine similarity between the two embeddings of an image.
        num_images: images compared.
        batch_sizes: the ONNX Runtime batch sizes used (1 and the rest: dynamic axis).
        atol: the bound on max_abs_diff.
    """

    max_abs_diff: float
    min_cosine: float
    num_images: int
    batch_sizes: tuple[int, ...]
    atol: float

    @property
    def passed(self) -> bool:
        # NaN or inf (an fp16 overflow) must fail: a comparison with NaN is False.
        return bool(np.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.atol)

    def summary(self) -> str:
        return (
            f"max abs diff {self.max_abs_diff:.3g}, min cosine {self.min_cosine:.6f} over "
            f"{self.num_images} images (ONNX Runtime batches {list(self.batch_sizes)}; bound "
            f"{self.atol:g}): {'ok' if self.passed else 'FAILED'}"
        )


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote and measured."""

    path: Path
    metadata: OnnxMetadata
    parity: ParityReport
    mlflow_run: dict[str, str]  # the checkpoint's {"tracking_uri", "run_id"}; {} for old ones
    parity_source: str  # where the parity images came from
    size_bytes: int
    skipped: list[str] = dataclasses.field(default_factory=list)  # unreadable parity images


# ---- digests ------------------------------------------------------------------------------


def config_digest(config: Mapping[str, Any]) -> str:
    """16 hex digits of SHA-256 over the config dict as canonical JSON (sorted keys)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- export -------------------------------------------------------------------------------


def onnx_path_for(checkpoint: str | Path, fp16: bool = False) -> Path:
    """Where the export of a checkpoint lives by default: beside its model.pt."""
    return checkpoint_file(checkpoint).parent / (ONNX_FP16_FILE if fp16 else ONNX_FILE)


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence the exporters' progress prints and deprecation warnings (kept for errors)."""
    buffer = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
        warnings.simplefilter("ignore")
        yield buffer


def model_to_onnx(
    model: Any, height: int, width: int, opset: int = DEFAULT_OPSET
) -> tuple[Any, str]:
    """Trace `model.embed` into an ONNX graph with a dynamic batch axis.

    The torch.export-based exporter (PyTorch's supported one) is tried first; a model it
    cannot capture is retried with the TorchScript exporter, which handles some dynamic Python
    the other refuses.

    Args:
        model: a ReidModel (any module with `embed(images) -> (B, D)`), put in eval mode.
        height, width: input size.
        opset: ONNX opset.

    Returns:
        (onnx.ModelProto with input `images` (B, 3, H, W) and output `embeddings` (B, D),
        the exporter used: "dynamo" or "torchscript").

    Raises:
        ExportError: neither exporter can export the model; names the model and both causes.
    """
    import torch

    class EmbeddingGraph(torch.nn.Module):
        """The inference path only: what the graph computes is `embed`, not `forward`."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.inner.embed(images)

    graph = EmbeddingGraph(model).eval()  # eval: the exporters restore this mode afterwards
    example = torch.randn(_EXAMPLE_BATCH, 3, height, width)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    failures = []
    with torch.no_grad():
        try:
            with _quiet():
                program = torch.onnx.export(
                    graph, (example,), dynamo=True, opset_version=opset, verbose=False,
                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                    external_data=False, **names,
                )
            return program.model_proto, "dynamo"
        except Exception as err:  # the exporters raise many types
            failures.append(f"torch.export-based exporter: {_first_line(err)}")
        try:
            buffer = io.BytesIO()
            with _quiet():
                torch.onnx.export(
                    graph, (example,), buffer, dynamo=False, opset_version=opset,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    **names,
                )
            import onnx

            return onnx.load_from_string(buffer.getvalue()), "torchscript"
        except Exception as err:
            failures.append(f"TorchScript exporter: {_first_line(err)}")
    config = getattr(model, "config", None)
    what = (f"model.arch={config.arch} model.backbone={config.backbone}" if config is not None
            else type(model).__name__)
    raise ExportError(f"{what}: ONNX cannot export this model ({'; '.join(failures)})")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text[:300]}"


def to_fp16(proto: Any) -> Any:
    """Weights and activations to float16, keeping the float32 input and output.

    Returns:
        a new onnx.ModelProto.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():  # it warns for every weight below float16's range (clamped, harmless)
        return convert_float_to_float16(proto, keep_io_types=True)


def set_metadata(proto: Any, metadata: OnnxMetadata) -> None:
    """Write `metadata` into the model's `metadata_props` (replacing earlier entries)."""
    keep = [p for p in proto.metadata_props if not p.key.startswith(_META_PREFIX)]
    del proto.metadata_props[:]
    for prop in keep:
        proto.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in metadata.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "reid-platform"
    proto.doc_string = (
        f"{metadata.arch} {metadata.backbone}: RGB images resized to {metadata.input_height}x"
        f"{metadata.input_width}, /{metadata.pixel_scale:g}, minus mean {list(metadata.mean)}, "
        f"divided by std {list(metadata.std)}, NCHW float32 -> L2-normalised "
        f"{metadata.embedding_dim}-d embeddings ({metadata.feature})"
    )


def read_metadata(path: str | Path) -> OnnxMetadata:
    """The contract of an exported file (`OnnxMetadata`).

    Raises:
        ExportError: not readable as ONNX, or not exported by reid-platform.
    """
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such ONNX file") from None
    except Exception as err:  # onnx raises DecodeError and others for damaged files
        raise ExportError(f"{path}: not a readable ONNX model ({_first_line(err)})") from None
    return OnnxMetadata.from_props({p.key: p.value for p in proto.metadata_props}, str(path))


def _check_writable(directory: Path, flag: str) -> None:
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{flag} {directory}: exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ExportError(f"{flag} {directory}: not writable ({err.strerror or err})") from None


# ---- parity -------------------------------------------------------------------------------


def parity_samples(config: Config, count: int, source: str | Path | None = None
                   ) -> tuple[list[Sample], str]:
    """Real images to compare PyTorch and ONNX Runtime on.

    Args:
        config: the checkpoint's config: its dataset's query images are used.
        count: images wanted (evenly spaced over the query set).
        source: instead, a dataset root, CSV manifest or folder of images (its gallery
            split, or every image).

    Returns:
        (samples, a description of where they came from).

    Raises:
        ExportError: the images cannot be found; names the dataset and the way out.
    """
    from reid_platform.data.root import load_config_dataset, resolve_data_root
    from reid_platform.retrieval.gallery import gallery_samples

    try:
        if source is not None:
            samples, fmt = gallery_samples(source)
            where = f"{len(samples)} images of {source} ({fmt})"
        else:
            dataset = load_config_dataset(resolve_data_root(config, progress=False),
                                          report=False)
            samples = dataset.query
            name, root = dataset.eval_name or dataset.name, dataset.eval_root or dataset.root
            where = f"the query set of {name} ({root})"
    except (DatasetError, ConfigError, OSError) as err:
        what = f"--parity-data {source}" if source is not None else (
            f"the checkpoint's dataset (data.root={config.data.root or '(empty)'}, "
            f"data.format={config.data.format})")
        raise ParityDataError(
            f"the parity check needs real images, but {what} cannot be read ({err}); give "
            "--parity-data PATH (a dataset root, CSV manifest or folder of images)"
        ) from None
    if not samples:
        raise ParityDataError(f"the parity check found no images in {where}")
    picks = np.unique(np.linspace(0, len(samples) - 1, min(count, len(samples))).round())
    return [samples[int(i)] for i in picks], where


def load_images(samples: Sequence[Sample], height: int, width: int
                ) -> tuple[np.ndarray, list[str]]:
    """Samples through the eval transform (what the service and the gallery build do).

    Returns:
        (images (N, 3, height, width) float32 normalised, "<path>: <why>" per unreadable image).
    """
    transform = build_eval_transform(height, width)
    images, skipped = [], []
    for sample in samples:
        try:
            image = read_image(sample.path, sample.box)
        except ImageDecodeError as err:
            skipped.append(str(err))
            continue
        images.append(transform(image=image)["image"].numpy())
    if not images:
        raise ParityDataError(
            f"none of the {len(samples)} parity images could be read: {skipped[:3]}")
    return np.stack(images).astype(np.float32, copy=False), skipped


def check_parity(model: Any, embedder: OnnxEmbedder, images: np.ndarray, atol: float
                 ) -> ParityReport:
    """Embed `images` with PyTorch (`model.embed`, eval mode) and with ONNX Runtime.

    ONNX Runtime sees the first image alone and the rest as one batch: batch sizes the export
    never traced, so the dynamic axis is checked too.

    Args:
        model: the PyTorch model.
        embedder: the ONNX Runtime session of its export.
        images: (N, 3, H, W) float32, normalised.
        atol: the bound on the max abs difference.
    """
    import torch

    model.eval()
    with torch.inference_mode():
        reference = np.concatenate([
            model.embed(torch.from_numpy(images[start:start + 32])).float().numpy()
            for start in range(0, len(images), 32)
        ])  # (N, D)
    sizes = (1, len(images) - 1) if len(images) > 1 else (1,)
    exported = np.concatenate([embedder(images[:1])] + (
        [embedder(images[1:])] if len(images) > 1 else []))  # (N, D)
    diff = float(np.abs(exported - reference).max())
    cosine = float((exported * reference).sum(axis=1).min())
    return ParityReport(diff, cosine, len(images), sizes, atol)


# ---- the job ------------------------------------------------------------------------------


def export_onnx(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    parity_images: int = PARITY_IMAGES,
    parity_data: str | Path | None = None,
    atol: float | None = None,
    num_threads: int | None = None,
) -> ExportResult:
    """Export a checkpoint's model to ONNX and check it against PyTorch on real images.

    Args:
        checkpoint: checkpoint directory or model.pt.
        out_dir: folder for the file (default: the checkpoint's folder); created if needed.
        fp16: weights and activations float16 (input and output stay float32).
        opset: ONNX opset.
        parity_images: how many of the checkpoint's query images to compare on.
        parity_data: compare on the images of this path instead (dataset, manifest, folder).
        atol: bound on the max abs embedding difference (default 1e-4, fp16 5e-3).
        num_threads: ONNX Runtime threads for the check (default: this process's CPUs).

    Returns:
        ExportResult; the file is `out_dir/model.onnx` (`model.fp16.onnx` with fp16), written
        only once the parity check passed (atomically: a reader never sees half a file).

    Raises:
        CheckpointError: not a checkpoint.
        ExportError: an unwritable out_dir, no parity images, a model ONNX cannot export, or
            an export whose embeddings differ from PyTorch's by more than atol.
    """
    import onnx
    import torch

    source = checkpoint_file(checkpoint)  # CheckpointError for a non-checkpoint
    payload = read_checkpoint(source)
    directory = Path(out_dir).expanduser().resolve() if out_dir else source.parent
    _check_writable(directory, "--out")  # before the slow part
    if parity_images < 1:
        raise ExportError(f"--parity-images must be >= 1, got {parity_images}")
    atol = (FP16_ATOL if fp16 else FP32_ATOL) if atol is None else float(atol)
    model, config = load_model(source)
    height, width = config.data.height, config.data.width
    samples, where = parity_samples(config, parity_images, parity_data)
    images, skipped = load_images(samples, height, width)

    proto, exporter = model_to_onnx(model, height, width, opset)
    if fp16:
        proto = to_fp16(proto)
    metadata = OnnxMetadata(
        input_height=height, input_width=width, embedding_dim=int(model.embedding_dim),
        arch=config.model.arch, backbone=config.model.backbone,
        config_digest=config_digest(payload["config"]), checkpoint_sha256=file_sha256(source),
        checkpoint_epoch=int(payload.get("epoch") or 0), precision="fp16" if fp16 else "fp32",
        exporter=exporter, opset=opset, torch_version=torch.__version__.split("+")[0],
    )
    set_metadata(proto, metadata)
    embedder = OnnxEmbedder(proto.SerializeToString(), num_threads=num_threads,
                            providers=["CPUExecutionProvider"])
    parity = check_parity(model, embedder, images, atol)
    if not parity.passed:
        raise ExportError(
            f"{source}: the ONNX export ({exporter}, {metadata.precision}) disagrees with "
            f"PyTorch: {parity.summary()}; not written"
        )
    metadata = dataclasses.replace(
        metadata, parity_max_abs_diff=parity.max_abs_diff,
        parity_min_cosine=parity.min_cosine, parity_images=parity.num_images, parity_atol=atol,
    )
    set_metadata(proto, metadata)
    target = directory / (ONNX_FP16_FILE if fp16 else ONNX_FILE)
    handle, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ExportResult(target, metadata, parity, dict(payload.get("mlflow_run") or {}), where,
                        target.stat().st_size, skipped)


def is_current(onnx_file: str | Path, checkpoint: str | Path) -> bool:
    """Whether `onnx_file` is an export of this checkpoint's weights as they are now."""
    try:
        metadata = read_metadata(onnx_file)
    except ExportError:
        return False
    return metadata.checkpoint_sha256 == file_sha256(checkpoint_file(checkpoint))


def ensure_onnx(
    checkpoint: str | Path,
    fp16: bool = False,
    fallback_parity_data: str | Path | None = None,
    **kwargs: Any,
) -> Path:
    """The ONNX file beside a checkpoint, exported now if it is missing or stale.

    Args:
        fallback_parity_data: images to check parity on when the checkpoint's own dataset is
            gone (the service and the gallery build pass the gallery).
        kwargs: passed to `export_onnx` (parity_images, parity_data, ...).

    Returns:
        the path of the up-to-date export.

    Raises:
        ExportError: as `export_onnx`.
    """
    path = onnx_path_for(checkpoint, fp16)
    if path.is_file() and is_current(path, checkpoint):
        return path
    try:
        return export_onnx(checkpoint, path.parent, fp16=fp16, **kwargs).path
    except ParityDataError:
        if not fallback_parity_data or kwargs.get("parity_data"):
            raise
    return export_onnx(checkpoint, path.parent, fp16=fp16,
                       **{**kwargs, "parity_data": fallback_parity_data}).path


def log_export(result: ExportResult, tracking_uri: str | None = None,
               run_id: str | None = None) -> tuple[str, str]:
    """Log the ONNX file, its contract and the parity numbers into an MLflow run.

    Artifacts `onnx/<file>` and `onnx/export.json` (metadata + parity); metrics
    `onnx_parity_max_abs_diff`, `onnx_parity_min_cosine` (`onnx_fp16_...` for fp16) at the
    checkpoint's epoch; tags `onnx.<precision>.path`, `.exporter`, `.opset`.

    Args:
        tracking_uri, run_id: the run; default the checkpoint's own (`result.mlflow_run`).

    Returns:
        (tracking URI, run id).

    Raises:
        ExportError: no run recorded or given, or the run is not in that store.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from reid_platform.tracking import RunLogger

    uri = tracking_uri or result.mlflow_run.get("tracking_uri", "")
    run_id = run_id or result.mlflow_run.get("run_id", "")
    if not uri or not run_id:
        raise ExportError(
            "the checkpoint records no MLflow run (it was written outside a training run, or "
            "before checkpoints recorded theirs)"
        )
    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        raise ExportError(f"MLflow run {run_id} not found at {uri} ({_first_line(err)})") from None
    meta = result.metadata
    prefix = "onnx_fp16_" if meta.precision == "fp16" else "onnx_"
    logger = RunLogger(uri, run_id)
    logger.log_metrics({f"{prefix}parity_max_abs_diff": result.parity.max_abs_diff,
                        f"{prefix}parity_min_cosine": result.parity.min_cosine},
                       step=meta.checkpoint_epoch)
    tag = f"onnx.{meta.precision}"
    logger.set_tags({f"{tag}.path": str(result.path), f"{tag}.exporter": meta.exporter,
                     f"{tag}.opset": str(meta.opset)})
    report = {"path": str(result.path), "size_bytes": result.size_bytes,
              "parity_source": result.parity_source,
              "parity": {**dataclasses.asdict(result.parity), "passed": result.parity.passed},
              "metadata": {k: _plain(v) for k, v in dataclasses.asdict(meta).items()}}
    with tempfile.TemporaryDirectory() as tmp:
        name = "export.fp16.json" if meta.precision == "fp16" else "export.json"
        (Path(tmp) / name).write_text(json.dumps(report, indent=2, sort_keys=True))
        logger.log_artifact(Path(tmp) / name, "onnx")
    logger.log_artifact(result.path, "onnx")
    return uri, run_id


# ---- runtime ------------------------------------------------------------------------------


def _gpu_visible() -> bool:
    """Whether this process sees a CUDA GPU (Ray hides the GPUs an actor was not given)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        import torch
    except ImportError:  # a torch-free deployment: trust the GPU build of ONNX Runtime
        return True
    return torch.cuda.is_available()


def execution_providers(
    metadata: OnnxMetadata,
    available: Sequence[str],
    gpu: bool,
    cache_dir: str | Path,
    max_batch_size: int,
) -> list[str | tuple[str, dict[str, Any]]]:
    """ONNX Runtime providers in order of preference, with their options.

    TensorRT first (fastest; compiles an engine per input-shape profile, so the profile spans
    batch 1..max_batch_size at the model's input size, and engines are cached on disk: a
    build takes minutes for a ResNet50); then CUDA (every op TensorRT leaves out, and the
    fallback where TensorRT is not installed); the CPU last, always. fp16 models get
    TensorRT's fp16 kernels; fp32 ones stay fp32, so their parity bound holds on GPU too.

    Args:
        metadata: the model's contract (input name and size, precision).
        available: `onnxruntime.get_available_providers()`.
        gpu: whether this process sees a GPU (a CPU-only actor of a GPU build must not
            ask for CUDA).
        cache_dir: where TensorRT engines and timing caches go.
        max_batch_size: largest batch the TensorRT profile covers.
    """
    providers: list[str | tuple[str, dict[str, Any]]] = []
    if gpu and "TensorrtExecutionProvider" in available:
        shape = f"{metadata.input_height}x{metadata.input_width}"
        name = metadata.input_name
        providers.append(("TensorrtExecutionProvider", {
            "device_id": 0,  # Ray's CUDA_VISIBLE_DEVICES makes the actor's GPU device 0
            "trt_fp16_enable": metadata.precision == "fp16",
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir),
            "trt_profile_min_shapes": f"{name}:1x3x{shape}",
            "trt_profile_opt_shapes": f"{name}:{max_batch_size}x3x{shape}",
            "trt_profile_max_shapes": f"{name}:{max_batch_size}x3x{shape}",
        }))
    if gpu and "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {
            "device_id": 0,
            # Dynamic batch sizes: let the arena grow in requested steps, not doubling.
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
        }))
    providers.append("CPUExecutionProvider")
    return providers


class OnnxEmbedder:
    """ONNX Runtime inference of an exported model, with the embedders' call shape.

        embedder = OnnxEmbedder("model.onnx")
        vectors = embedder(images)   # (B, 3, H, W) float32 normalised -> (B, D) float32

    Args:
        model: path of the .onnx file, or its bytes.
        num_threads: CPU threads of the session (intra-op); default: the CPUs of this process
            (a Ray actor's CPU share, else the CPUs it may run on).
        providers: execution providers to use; default: TensorRT, CUDA (when a GPU is visible
            and ONNX Runtime has them), then the CPU (`execution_providers`).
        max_batch_size: calls are run in chunks of at most this many images (it also bounds
            the TensorRT shape profile).
        spin: let idle intra-op threads busy-wait for work. Off by default: a replica shares
            its node with the HTTP proxy, the ingress and the index shards, and spinning
            threads take CPU from them between batches.

    Raises:
        ExportError: not a reid-platform ONNX model, or ONNX Runtime cannot load it.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        num_threads: int | None = None,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
        max_batch_size: int = 64,
        spin: bool = False,
    ):
        import onnxruntime as ort

        source = "model" if isinstance(model, bytes) else str(model)
        if not isinstance(model, bytes):
            model = str(Path(model).expanduser())
            if not Path(model).is_file():
                raise ExportError(f"{model}: no such ONNX file")
        self.num_threads = int(num_threads) if num_threads else process_cpus()
        if self.num_threads < 1:
            raise ExportError(f"num_threads must be >= 1, got {num_threads}")
        self.max_batch_size = int(max_batch_size)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1  # one sequential graph: a second pool only competes
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3  # errors only: no per-node placement warnings
        if providers is None:
            metadata = self._peek_metadata(model, source)
            cache = (Path(source).parent if not isinstance(model, bytes)
                     else Path(tempfile.gettempdir())) / "trt_cache"
            providers = execution_providers(metadata, ort.get_available_providers(),
                                            _gpu_visible(), cache, self.max_batch_size)
        try:
            self.session = ort.InferenceSession(model, options, providers=list(providers))
        except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
            raise ExportError(f"{source}: ONNX Runtime cannot load it ({_first_line(err)})"
                              ) from None
        self.metadata = OnnxMetadata.from_props(
            self.session.get_modelmeta().custom_metadata_map, source)
        self.providers = self.session.get_providers()
        self.input_size = (self.metadata.input_height, self.metadata.input_width)
        self.embedding_dim = self.metadata.embedding_dim

    @staticmethod
    def _peek_metadata(model: str | bytes, source: str) -> OnnxMetadata:
        if isinstance(model, bytes):
            import onnx

            proto = onnx.load_from_string(model)
            return OnnxMetadata.from_props({p.key: p.value for p in proto.metadata_props},
                                           source)
        return read_metadata(model)

    def __call__(self, images: Any) -> np.ndarray:
        """Embed a batch.

        Args:
            images: (B, 3, H, W) normalised, as the eval transform makes them (numpy, or
                anything `np.asarray` takes, e.g. a CPU torch tensor); cast to float32.

        Returns:
            (B, D) float32, unit L2 norm per row.

        Raises:
            ValueError: the batch does not have the model's input shape.
        """
        batch = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
        expected = (3, *self.input_size)
        if batch.ndim != 4 or batch.shape[1:] != expected:
            raise ValueError(
                f"images have shape {tuple(batch.shape)}; this model takes (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}) float32, normalised (the eval transform)"
            )
        if len(batch) == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        name = self.metadata.input_name
        out = np.concatenate([
            self.session.run(None, {name: batch[start:start + self.max_batch_size]})[0]
            for start in range(0, len(batch), self.max_batch_size)
        ]).astype(np.float32, copy=False)  # (B, D)
        # The graph normalises already; again in float32 so fp16 models give exact unit rows.
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
