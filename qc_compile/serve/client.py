"""A small client for ``qc-compile serve`` (tritonclient, HTTP or gRPC).

    from qc_compile.serve.client import VideoClient
    with VideoClient("localhost:8000") as c:                 # "grpc://localhost:8001" for gRPC
        r = c.generate("a red circle moving left on a black background", seed=3, steps=30, policy="quantcache")
        r.frames.shape, r.trace["compute_fraction"]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from qc_compile.serve.protocol import INPUTS, MODEL_NAME

_TRITON_DTYPE = {np.bytes_: "BYTES", np.int64: "INT64", np.int32: "INT32", np.bool_: "BOOL"}


class ServeError(RuntimeError):
    """The server answered with an error status (``status`` 400 bad request, 503 draining, 500 internal)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class VideoResult:
    frames: np.ndarray  # (T, H, W, 3) uint8
    trace: dict
    mp4: bytes | None = None


def request_arrays(prompt: Any, **fields: Any) -> dict[str, np.ndarray]:
    """Inputs as (1, 1) arrays (batch dimension first), with the dtypes the server declares. Values are sent as
    given (tests send wrong ones on purpose); ``None`` leaves an input out."""
    out = {}
    for name, value in {"prompt": prompt, **fields}.items():
        if value is None:
            continue
        if isinstance(value, np.ndarray):
            out[name] = value
            continue
        dtype = INPUTS[name][0] if name in INPUTS else None
        if dtype is np.bytes_ or isinstance(value, (str, bytes)):
            v = value.encode("utf-8") if isinstance(value, str) else value
            if isinstance(v, (dict, list)):
                v = json.dumps(v).encode()
            out[name] = np.array([[v]], dtype=np.object_)
        else:
            out[name] = np.array([[value]], dtype=dtype)
    return out


class VideoClient:
    """``url``: ``host:port`` or ``http://host:port`` (HTTP), ``grpc://host:port`` (gRPC)."""

    def __init__(self, url: str, *, timeout_s: float = 600.0, model: str = MODEL_NAME) -> None:
        self.grpc = url.startswith("grpc://")
        address = url.split("://", 1)[-1]
        self.model = model
        self.timeout_s = timeout_s
        if self.grpc:
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc

            self._kw = {"connection_timeout": timeout_s, "network_timeout": timeout_s}
        self.tc = tc
        self.client = tc.InferenceServerClient(address, **(self._kw if not self.grpc else {}))

    def __enter__(self) -> "VideoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready() and self.client.is_model_ready(self.model))
        except Exception:
            return False

    def infer_raw(self, arrays: dict[str, np.ndarray], outputs: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Send arrays as they are; returns every output present (raises tritonclient's InferenceServerException on
        a transport-level rejection, e.g. a wrong datatype or a full queue)."""
        inputs = []
        for name, a in arrays.items():
            dt = "BYTES" if a.dtype == np.object_ else self.tc.np_to_triton_dtype(a.dtype)
            i = self.tc.InferInput(name, list(a.shape), dt)
            i.set_data_from_numpy(a)
            inputs.append(i)
        names = outputs or ("status", "error", "frames", "mp4", "trace")
        outs = [self.tc.InferRequestedOutput(n) for n in names]
        kw = {"client_timeout": self.timeout_s} if self.grpc else {}
        r = self.client.infer(self.model, inputs, outputs=outs, **kw)
        got = {}
        for n in names:
            try:
                v = r.as_numpy(n)
            except Exception:
                v = None
            if v is not None:
                got[n] = v
        return got

    def generate(self, prompt: str, *, seed: int = 0, steps: int | None = None, policy: str | None = None,
                 thresholds: dict | str | None = None, plan: str | None = None, mp4: bool = False) -> VideoResult:
        arrays = request_arrays(prompt, seed=seed, steps=steps, policy=policy,
                                thresholds=thresholds if thresholds is None or isinstance(thresholds, str)
                                else json.dumps(thresholds),
                                plan=plan, mp4=mp4 or None)
        got = self.infer_raw(arrays)
        status = int(got["status"].reshape(-1)[0])
        if status != 200:
            raise ServeError(status, got["error"].reshape(-1)[0].decode("utf-8", "replace"))
        mp4_bytes = got["mp4"].reshape(-1)[0] if mp4 and "mp4" in got else None
        return VideoResult(frames=got["frames"][0], trace=json.loads(got["trace"].reshape(-1)[0]), mp4=mp4_bytes)
