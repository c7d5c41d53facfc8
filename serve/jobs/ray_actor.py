"""`RayActorBackend`: a `MemoryStore` inside a named, detached Ray actor (the embedded default).

One actor serialises every operation of every replica: MemoryStore's operations never await, so
each runs to its end before the actor's loop takes the next. The backend's methods are
`StoreBackend`'s, generated from the Protocol (name, signature, docstring) and each forwarded to the
actor's method of the same name, so no operation is restated here; tests/unit/test_store_protocol.py
checks the result like the hand-written backends.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from serve.jobs.memory import MemoryStore
from serve.jobs.models import StoreUnavailable
from serve.jobs.store import STORE_OPERATIONS, StoreBackend


class RayActorBackend:
    def __init__(self, name: str, result_ttl_s: float, max_attempts: int):
        import ray

        # Detached and found by name: it outlives the ingress replica that created it (a replica
        # crash must not lose the queue) and every replica in the cluster gets the same one.
        self._actor = (
            ray.remote(MemoryStore)
            .options(name=name, namespace="llava-serve", lifetime="detached", get_if_exists=True, num_cpus=0)
            .remote(result_ttl_s, max_attempts)
        )

    async def _forward(self, op: str, args: tuple[Any, ...]) -> Any:
        from ray.exceptions import RayActorError

        try:
            return await getattr(self._actor, op).remote(*args)
        except RayActorError as exc:  # also ActorDiedError, ActorUnavailableError
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
