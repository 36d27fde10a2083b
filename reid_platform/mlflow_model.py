"""The MLflow Model of a reid-platform checkpoint: a pyfunc mapping a batch of images to
embeddings. Logged "from code" (`reid_platform.tracking.log_reid_model`).

MLflow copies this file into the model and runs it when `mlflow.pyfunc.load_model` loads the
model: no Python object is unpickled (a pickled `python_model` would run whatever code its
pickle names). The weights are the artifact `checkpoint` (`artifacts/model.pt` inside the
model), read by `reid_platform.checkpoint.read_checkpoint` with the safe loader
(`torch.load(weights_only=True)`). The platform's own jobs and the service do not load the
pyfunc at all: they download `artifacts/model.pt` and read it the same way.

    model = mlflow.pyfunc.load_model("models:/demo@production")
    embeddings = model.predict(images)   # (N, H, W, 3) uint8 RGB -> (N, D) float32, unit rows

Images of any size are resized to the model's input size (`metadata.reid_platform.input_size`)
and normalised exactly as evaluation and the gallery build do.

Not imported by the package: `mlflow.models.set_model` below registers the model object with
MLflow's loader, which is only meaningful while MLflow loads this file.
"""

from __future__ import annotations

import mlflow
import numpy as np

PREDICT_BATCH = 64  # images per forward pass


class ReidEmbeddingModel(mlflow.pyfunc.PythonModel):
    """(N, H, W, 3) uint8 RGB images -> (N, D) float32 L2-normalised embeddings."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import torch

        from reid_platform.checkpoint import load_model
        from reid_platform.data.transforms import build_eval_transform

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, config = load_model(context.artifacts["checkpoint"], self.device)
        self.transform = build_eval_transform(config.data.height, config.data.width)

    # model_input is hinted np.ndarray alone: MLflow infers no schema from it (the logged
    # signature is explicit); a union or dict hint makes MLflow warn at every load.
    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: np.ndarray, params=None
    ) -> np.ndarray:
        """Embed a batch of images.

        Args:
            model_input: (N, H, W, 3) uint8 RGB images (one size for the whole batch), as an
                array or as {"images": array} (the signature's tensor name).

        Returns:
            (N, D) float32, each row L2-normalised (cosine similarity = dot product).
        """
        import torch

        if isinstance(model_input, dict):  # the signature names the tensor: {"images": ...}
            model_input = model_input["images"]
        images = np.asarray(model_input)
        if images.ndim == 3:  # a single image
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected a batch of RGB images (N, H, W, 3), got shape {images.shape}"
            )
        out = []
        for start in range(0, len(images), PREDICT_BATCH):
            chunk = images[start : start + PREDICT_BATCH]
            batch = torch.stack([self.transform(image=img)["image"] for img in chunk])
            with torch.inference_mode():
                out.append(self.model.embed(batch.to(self.device)).float().cpu().numpy())
        dim = self.model.embedding_dim
        return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)


mlflow.models.set_model(ReidEmbeddingModel())
