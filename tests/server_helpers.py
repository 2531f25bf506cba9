"""A server in the test process: an engine behind `create_app`, with the `openai` client and raw httpx posts."""

from __future__ import annotations

from typing import Any

import httpx
import openai

from vkpack.runtime.server.app import create_app
from vkpack.runtime.server.batch import Scheduler
from vkpack.runtime.server.runner import BackgroundServer


class LiveServer:
    """Serves `engine` (closed with the server) on a free port; `app_kw` go to create_app."""

    def __init__(self, engine: Any, timeout: float = 120, **app_kw: Any):
        self.engine = engine
        self.app = create_app(engine, **app_kw)
        self.srv = BackgroundServer(self.app).__enter__()
        self.url = self.srv.url
        self.timeout = timeout
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=timeout)

    @property
    def scheduler(self) -> Scheduler:
        return self.app.state.scheduler

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=self.timeout)

    def close(self) -> None:
        self.srv.__exit__()
        self.engine.close()
