"""What the routers share: config, keys, engine, image intake. One instance per ingress replica."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

from serve.api.reads import ReadBudget
from serve.auth import Keys
from serve.config import ServeConfig
from serve.engine.types import Engine
from serve.jobs.store import JobStore
from serve.media.intake import ImageIntake
from serve.webhooks import WebhookSender


@dataclass
class Services:
    config: ServeConfig
    keys: Keys  # reread as the file changes
    engine: Engine
    media: ImageIntake
    store: JobStore
    webhooks: WebhookSender
    reads: ReadBudget  # per-key budgets of polls and status streams, this replica's
    started: int = field(default_factory=lambda: int(time.time()))  # unix seconds: the model list's `created`

    @classmethod
    def build(cls, cfg: ServeConfig, engine: Engine, store: JobStore) -> Services:
        """Everything but the engine and the store, from the config."""
        return cls(
            config=cfg,
            keys=Keys(cfg.auth, cfg.limits),
            engine=engine,
            media=ImageIntake(cfg.media),
            store=store,
            webhooks=WebhookSender(cfg.media, cfg.webhooks),
            reads=ReadBudget(cfg.reads),
        )

    async def aclose(self) -> None:
        await self.media.aclose()
        await self.webhooks.aclose()  # may hand unfinished deliveries back to the store: before closing it
        await self.store.aclose()


# Dependencies are `async def` although they never await: FastAPI runs a plain `def` one on a worker
# thread, a thread hop per dependency per request (loadtest/README.md: status polls).
async def get_services(request: Request) -> Services:
    return request.app.state.services
