"""Identity: how much a frame still shows the reference's person, as the cosine similarity of
face-recognition embeddings. The model is SFace (OpenCV Zoo's MobileFaceNet, 128-d, Apache-2.0;
`weights.lock` component `sface`), run by OpenCV's own `FaceRecognizerSF`, on faces put on the
112 x 112 five-point template it was trained with (the one ArcFace-style recognisers share)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from hellomeme_cli.errors import HellomemeError
from hellomeme_cli.logs import native_stderr_muted
from hellomeme_cli.face.signals import PDFGC_TEMPLATE_LANDMARKS, similarity_transform

COMPONENT = "sface"
MODEL_FILE = "face_recognition_sface_2021dec.onnx"
ALIGNED_SIZE = 112
# Image-left and image-right eye centres, nose tip, image-left and image-right mouth corners, in pixels of the 112 crop.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]])
# The same five points on MediaPipe's mesh (the iris centres are the eye centres).
TEMPLATE_LANDMARKS = PDFGC_TEMPLATE_LANDMARKS


class IdentityModel:
    """Embeddings of faces found by the tracker: `embedding(frame, landmarks)` -> a unit (128,) vector."""

    def __init__(self, model_path: Path):
        try:
            with native_stderr_muted():  # OpenCV's DNN engine warns about its backends there
                self._recognizer = cv2.FaceRecognizerSF.create(str(model_path), "")
        except cv2.error as error:
            raise HellomemeError(f"{model_path}: not a usable face recognition model ({str(error).strip().splitlines()[-1]})") from None

    def embedding(self, frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """frame (H, W, 3) uint8 RGB; landmarks (478, 2+) in its pixels."""
        matrix = similarity_transform(landmarks[list(TEMPLATE_LANDMARKS), :2].astype(np.float64), TEMPLATE_112)
        aligned = cv2.warpAffine(frame, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), flags=cv2.INTER_LINEAR)
        feature = self._recognizer.feature(cv2.cvtColor(aligned, cv2.COLOR_RGB2BGR)).reshape(-1).astype(np.float64)  # OpenCV's BGR
        return feature / max(np.linalg.norm(feature), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two unit embeddings, in [-1, 1]."""
    return float(np.clip(np.dot(a, b), -1.0, 1.0))
