"""The embedded default: the bundle's own classifier, run in-process by onnxruntime."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Literal

import numpy as np

from service.defense.runtime import OnnxModel
from service.offload import Offload


class EmbeddedUpstream:
    remote = False  # the classifier shares this process's cores: nothing to overlap

    def __init__(self, model: OnnxModel, executor: Executor,
                 outputs: Literal["logits", "probabilities"] = "logits") -> None:
        self.model = model
        self.offload = Offload(executor)
        self.outputs = outputs

    def describe(self) -> str:
        return f"embedded onnxruntime classifier {self.model.path.name} on {self.model.providers[0]}"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ready(self) -> bool:
        return True

    async def infer(self, x: np.ndarray) -> np.ndarray:
        # onnxruntime releases the GIL: a call too long for the event loop runs on a worker thread
        return await self.offload(self.model, x)
