"""Experiment trackers: which of Accelerate's trackers `train.tracker` may name, and images sent to any of them.

Scalars go through `accelerator.log`. Accelerate has no tracker-generic image call, so the sample grid goes
to each tracker in the form it takes (its own `log_images`, or the PNG as an artifact / image file);
trackio gets scalars only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from PIL import Image

from kl_ae.common.config import ConfigError

# Accelerate's tracker names -> the pip package that provides each
TRACKERS = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}

log = logging.getLogger(__name__)


def check_tracker(name: str) -> None:
    """A tracker that is not installed is a config error before the run (Accelerate would drop it quietly)."""
    if name == "none":
        return
    from accelerate.tracking import get_available_trackers

    if name not in {str(t.value) for t in get_available_trackers()}:
        raise ConfigError(f"train.tracker: {name} is not installed (pip install {TRACKERS[name]}), or use tensorboard")


def log_image(accelerator: Accelerator, key: str, pixels: np.ndarray, path: Path, step: int) -> None:
    """Send an image (H, W, 3) uint8, also saved at `path`, to every tracker; a tracker's failure is a warning."""
    image = Image.fromarray(pixels)
    for tracker in accelerator.trackers:
        name = tracker.name
        try:
            if name == "tensorboard":
                tracker.log_images({key: pixels[None]}, step=step, dataformats="NHWC")
            elif name in ("wandb", "swanlab"):
                tracker.log_images({key: [image]}, step=step)
            elif name in ("aim", "clearml"):
                tracker.log_images({key: image if name == "aim" else pixels}, step=step)
            elif name == "mlflow":
                tracker.log_artifact(str(path), artifact_path="samples")
            elif name == "comet_ml":
                tracker.tracker.log_image(str(path), name=key, step=step)
            elif name == "dvclive":
                tracker.tracker.log_image(f"{key.replace('/', '_')}.png", image)
        except Exception as e:  # an image that does not reach a tracker must not end a run
            log.warning("tracker %s: could not log the image %s: %s: %s", name, key, type(e).__name__, e)
