"""The constructor arguments the pydantic-based adapters (LangChain, LlamaIndex) share."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ._adapter import Clients
from ._client import DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, AsyncDistillClient, DistillClient


class AdapterSettings(BaseModel):
    """A client (`client=`) or the settings to build one, plus the request options."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: DistillClient | AsyncDistillClient | None = Field(default=None, exclude=True)
    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = Field(default=None, repr=False, exclude=True)
    timeout: float | None = None  # seconds; None = the client's default
    max_retries: int = DEFAULT_MAX_RETRIES
    threshold: float | None = None
    lambda_: float | None = None
    target_k: int | None = None
    guards: list[str] | None = None
    linkage: str | None = None
    selection: str | None = None

    _clients: Clients = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        self._clients = Clients(self.client, base_url=self.base_url, api_key=self.api_key,
                                timeout=self.timeout, max_retries=self.max_retries)

    def _options(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "lambda_": self.lambda_, "target_k": self.target_k,
                "guards": self.guards, "linkage": self.linkage, "selection": self.selection}
