"""How Eachlabs predictions run, and their webhook when they finish."""

from __future__ import annotations

from typing import Any

from serve.api.eachlabs.protocol import LlavaInput, error_output, to_generation_request
from serve.api.jobs import generate_for_job, send_webhook
from serve.api.services import Services
from serve.jobs.models import Job, JobResult, JobStatus
from serve.jobs.runner import LogFn


def webhook_payload(job: Job) -> dict[str, Any] | None:
    """Eachlabs' webhook body (api-spec §3.8): on success and failure only, never on cancellation."""
    if job.status == JobStatus.SUCCEEDED and job.result is not None:
        return {"exec_id": job.id, "flow_id": None, "status": "succeeded", "output": job.result.chunks, "error": ""}
    if job.status == JobStatus.FAILED and job.error is not None:
        failed = {"id": "", "status": "", "output": "", "error": error_output(job.error)}
        return {"exec_id": job.id, "flow_id": None, "status": "failed", "output": [failed], "error": ""}
    return None


class EachlabsExecutor:
    def __init__(self, services: Services):
        self._services = services

    async def run(self, job: Job, log: LogFn) -> JobResult:
        inp = LlavaInput.model_validate(job.input)
        model = self._services.config.model
        return await generate_for_job(
            self._services,
            job,
            inp.image,
            lambda image: to_generation_request(inp, request_id=job.id, owner=job.owner, image=image, model=model),
            log,
        )

    def detail(self, exc: Exception, job: Job) -> None:
        return None  # the error kind and message are all Eachlabs reports (error_code, error_message)

    def finished(self, job: Job) -> None:
        url, payload = job.meta.get("webhook_url"), webhook_payload(job)
        if url and payload is not None:
            secret = job.meta.get("webhook_secret")
            send_webhook(self._services, job, url, payload, {"X-Webhook-Secret": secret} if secret else {})
