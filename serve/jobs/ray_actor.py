"""`RayActorBackend`: a `MemoryStore` inside a named, detached Ray actor (the embedded default).

One actor serialises every operation of every replica: MemoryStore's operations never await, so
each runs to its end before the actor's loop takes the next. The backend's methods are
`StoreBackend`'s, generated from the Protocol (name, signature, docstring) and each forwarded to the
actor's method of the same name, so no operation is restated here; tests/unit/test_store_protocol.py
checks the result like the hand-written backends.

The actor is restarted when it dies, and starts empty: what it held is lost (production uses Redis;
docs/architecture.md, "The job store"). A call that fails on a dead actor is StoreUnavailable, and the
next one looks the actor up by name again (creating it if nobody has yet).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from serve.jobs.memory import MemoryStore
from serve.jobs.models import StoreUnavailable
from serve.jobs.store import STORE_OPERATIONS, StoreBackend


class RayActorBackend:
    def __init__(self, name: str, result_ttl_s: float, max_attempts: int):
        self._name, self._args = name, (result_ttl_s, max_attempts)
        self._actor: Any = None
        self._resolve()

    def _resolve(self) -> Any:
        import ray

        # Detached and found by name: it outlives the ingress replica that created it (a replica
        # crash must not lose the queue) and every replica in the cluster gets the same one.
        # Restarted when it dies, empty (docs/architecture.md, "The job store"). A call in flight then, or
        # sent while it restarts, is retried on the new one: applying an operation again is safe there, as
        # the store it was applied to is gone. Bounded, so a store that cannot come back is a 503, not a hang.
        self._actor = (
            ray.remote(MemoryStore)
            .options(name=self._name, namespace="llava-serve", lifetime="detached", get_if_exists=True,
                     num_cpus=0, max_restarts=-1, max_task_retries=3)
            .remote(*self._args)
        )
        return self._actor

    async def _forward(self, op: str, args: tuple[Any, ...]) -> Any:
        from ray.exceptions import RayActorError

        try:
            actor = self._actor if self._actor is not None else self._resolve()
        except Exception as exc:  # the cluster could not find or create it (GCS away): a 503 like the rest
            raise StoreUnavailable(f"job store actor unavailable: {type(exc).__name__}") from exc
        try:
            return await getattr(actor, op).remote(*args)
        except RayActorError as exc:  # also ActorDiedError, ActorUnavailableError
            # Found by name again on the next call: a dead actor's name is free, so another replica (or that
            # call) creates it anew instead of every call failing until the replicas restart.
            self._actor = None
            raise StoreUnavailable(f"job store actor unavailable: {type(exc).__name__}") from exc


def _forwarder(op: str) -> Callable[..., Any]:
    spec = getattr(StoreBackend, op)
    signature = inspect.signature(spec)

    async def forward(self: RayActorBackend, *args: Any, **kwargs: Any) -> Any:
        # Bound here, so a wrong call fails in the caller, not inside the actor.
        bound = signature.bind(self, *args, **kwargs)
        return await self._forward(op, bound.args[1:])

    forward.__name__, forward.__qualname__ = op, f"RayActorBackend.{op}"
    forward.__doc__, forward.__annotations__ = spec.__doc__, spec.__annotations__
    forward.__signature__ = signature  # type: ignore[attr-defined]
    return forward


for _op in STORE_OPERATIONS:
    setattr(RayActorBackend, _op, _forwarder(_op))
