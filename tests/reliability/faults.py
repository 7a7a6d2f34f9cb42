"""A test seam for model faults: real ONNX Runtime models whose inference can be told to fail.

`FaultSwitch.factory` is a `runtime_factory` for `create_app`: it loads the real model and wraps
its `predict` so that a test can make it raise, or hang (until released or for `hang_s`), and
then heal, while the server runs. Production code has no fault hooks; only this factory does.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model.packing import PackedImage
from service.runtime import ModelRuntime, Prediction, RuntimeOptions


class InjectedFault(RuntimeError):
    pass


@dataclass
class FaultSwitch:
    mode: str = "ok"  # "ok", "raise" or "hang"
    hang_s: float = 30.0
    calls: int = 0
    hung: int = 0  # calls currently hanging
    _release: threading.Event = field(default_factory=threading.Event)

    def set(self, mode: str) -> None:
        if mode != "hang":
            self._release.set()  # wakes any hanging call
        else:
            self._release.clear()
        self.mode = mode

    def factory(self, path: Path, options: RuntimeOptions) -> ModelRuntime:
        runtime = ModelRuntime(path, options)
        real = runtime.predict

        def predict(items: Sequence[PackedImage]) -> list[Prediction]:
            self.calls += 1
            if self.mode == "raise":
                raise InjectedFault("injected inference failure")
            if self.mode == "hang":
                self.hung += 1
                try:
                    self._release.wait(self.hang_s)
                finally:
                    self.hung -= 1
            return real(items)

        # A test seam: the real model behind the injected behaviour (mypy refuses method assignment).
        runtime.predict = predict  # type: ignore[method-assign]
        return runtime
