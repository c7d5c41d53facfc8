"""How fal jobs run (the queue API's worker side): the same translation as the sync route."""

from __future__ import annotations

from typing import Any

from serve.api.fal.errors import to_fal_error
from serve.api.fal.protocol import FalInput, to_generation_request, webhook_payload
from serve.api.jobs import generate_for_job, send_webhook
from serve.api.services import Services
from serve.jobs.models import Job, JobResult
from serve.jobs.runner import LogFn


class FalExecutor:
    def __init__(self, services: Services):
        self._services = services

    async def run(self, job: Job, log: LogFn) -> JobResult:
        inp = FalInput.model_validate(job.input)
        model = self._services.config.model
        return await generate_for_job(
            self._services,
            job,
            inp.image_url,
            lambda image: to_generation_request(
                inp, request_id=job.id, owner=job.owner, image=image, model=model, stream=True
            ),
            log,
        )

    def detail(self, exc: Exception, job: Job) -> Any:
        # fal replays a failed job's original HTTP error from the result endpoint.
        err = to_fal_error(exc, image_url=job.input.get("image_url"), prompt=job.input.get("prompt"))
        return {"status_code": err.status_code, "body": err.body, "headers": err.headers}

    def finished(self, job: Job) -> None:
        if url := job.meta.get("webhook_url"):
            send_webhook(self._services, job, url, webhook_payload(job))
