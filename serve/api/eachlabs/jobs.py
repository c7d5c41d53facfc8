"""How Eachlabs predictions run, and their webhook when they finish."""

from __future__ import annotations

from serve.api.eachlabs.protocol import LlavaInput, to_generation_request
from serve.api.jobs import generate_for_job
from serve.api.services import Services
from serve.jobs.models import Job, JobResult
from serve.jobs.runner import LogFn


class EachlabsExecutor:
    def __init__(self, services: Services):
        self._services = services

    async def run(self, job: Job, log: LogFn) -> JobResult:
        inp = LlavaInput.model_validate(job.input)
        model = self._services.config.model
        return await generate_for_job(
            self._services,
            inp.image,
            lambda image: to_generation_request(inp, request_id=job.id, owner=job.owner, image=image, model=model),
            log,
        )

    def detail(self, exc: Exception, job: Job) -> None:
        return None  # the error kind and message are all Eachlabs reports (error_code, error_message)
