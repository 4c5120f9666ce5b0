"""Model clients used by the worker: `ModelClient` (HTTP to the BentoML service) and its in-process
twin `LocalModel` (the booster directly, for tests and single-process use). Same async interface:

    await client.predict(features: np.ndarray) -> np.ndarray   # probabilities, one per row
    await client.predict_explain(features) -> rows x (1 + 2k): probability, (feature index, SHAP) pairs
    await client.metadata() -> {"name", "version", "threshold", "feature_names"}
"""
from __future__ import annotations

import asyncio

import numpy as np
import orjson

from vigil import tracing
from vigil_inference.model import LoadedModel


def encode_features(features: np.ndarray) -> bytes:
    """{"features": [[...], ...]}; NaN (missing) becomes JSON null, which the service maps back to NaN."""
    x = np.asarray(features, dtype=np.float64)
    return orjson.dumps({"features": x}, option=orjson.OPT_SERIALIZE_NUMPY)


class ModelClient:
    """Async client of `vigil_inference.service:SepsisRisk` (BentoML 1.4 JSON over HTTP)."""

    def __init__(self, url: str, *, timeout: float = 30.0, ca: str = ""):
        """`ca`: PEM file of the CA an https:// model server's certificate is checked against (empty:
        the system's trust store)."""
        import ssl

        import httpx

        self.url = url.rstrip("/")
        verify = ssl.create_default_context(cafile=ca) if ca else True
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, verify=verify)
        self._metadata: dict | None = None

    async def predict(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError("features must be a 2-D array")
        if len(x) == 0:
            return np.empty(0)
        r = await self._http.post("/predict", content=encode_features(x),
                                  headers=tracing.inject({"content-type": "application/json"}))
        r.raise_for_status()
        out = np.asarray(orjson.loads(r.content), dtype=np.float64)
        if out.shape != (len(x),):
            raise RuntimeError(f"model service returned {out.shape} for {len(x)} rows")
        return out

    async def predict_explain(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if len(x) == 0:
            return np.empty((0, 1))
        r = await self._http.post("/predict_explain", content=encode_features(x),
                                  headers=tracing.inject({"content-type": "application/json"}))
        r.raise_for_status()
        out = np.asarray(orjson.loads(r.content), dtype=np.float64)
        if out.ndim != 2 or len(out) != len(x):
            raise RuntimeError(f"model service returned {out.shape} for {len(x)} rows")
        return out

    async def metadata(self) -> dict:
        if self._metadata is None:
            r = await self._http.post("/metadata", content=b"{}", headers={"content-type": "application/json"})
            r.raise_for_status()
            self._metadata = orjson.loads(r.content)
        return self._metadata

    async def ready(self) -> bool:
        import httpx

        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()


class LocalModel:
    """In-process twin of ModelClient: predicts with the booster in a thread."""

    def __init__(self, model: LoadedModel):
        self.model = model

    async def predict(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if len(x) == 0:
            return np.empty(0)
        return await asyncio.to_thread(self.model.predict, x)

    async def predict_explain(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if len(x) == 0:
            return np.empty((0, 1))
        return await asyncio.to_thread(self.model.predict_explain, x)

    async def metadata(self) -> dict:
        m = self.model
        return {"name": m.name, "version": m.version, "threshold": m.threshold,
                "feature_names": list(m.feature_names)}

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
