"""API keys: the keys file, and looking a presented key up in constant time.

A key never leaves this module: everything downstream (logs, metrics, job owners) uses the
entry's `name`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from serve.config import AuthConfig, ConfigError, LimitsConfig
from serve.jobs.models import Limits


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = Field(min_length=8, description="The secret clients send.", repr=False)
    name: str = Field(min_length=1, description="Who owns the key; used in logs, metrics and job ownership.")
    rate_per_minute: int | None = Field(None, gt=0, description="Override of the default rate limit.")
    max_concurrent: int | None = Field(None, gt=0, description="Override of the default concurrency cap.")


class Caller(BaseModel):
    """An authenticated caller, as the rest of the service sees it (no key inside)."""

    model_config = ConfigDict(frozen=True)

    name: str
    limits: Limits


_ENTRIES = TypeAdapter(list[KeyEntry])
log = logging.getLogger(__name__)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, entries: list[KeyEntry], limits: LimitsConfig):
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ValueError("key names must be unique")
        if len({e.key for e in entries}) != len(entries):
            raise ValueError("keys must be unique")
        # Compare fixed-length digests so neither the key's length nor its content leaks through timing.
        self._entries = [
            (
                _digest(e.key),
                Caller(
                    name=e.name,
                    limits=Limits(
                        rate_per_minute=e.rate_per_minute or limits.rate_per_minute,
                        max_concurrent=e.max_concurrent or limits.max_concurrent,
                        max_pending=limits.max_pending,
                        max_stored_bytes=limits.max_stored_bytes,
                    ),
                ),
            )
            for e in entries
        ]

    @classmethod
    def load(cls, path: Path, limits: LimitsConfig, content: bytes | None = None) -> KeyRing:
        """The keys file at `path` (its `content` when already read)."""
        try:
            data = yaml.safe_load(Path(path).read_bytes() if content is None else content)
            return cls(_ENTRIES.validate_python(data or []), limits)
        except OSError as exc:
            raise ConfigError(str(path), [f"auth.keys_file: cannot read: {exc.strerror}"]) from None
        except yaml.YAMLError as exc:
            # Where and what only: the YAML error's own text quotes the line, which holds a secret.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(str(path), [f"auth.keys_file: not valid YAML{where}: {what}"]) from None
        except ValidationError as exc:
            # Never echo the input: it is a secret.
            errs = [
                f"auth.keys_file[{'.'.join(str(p) for p in e['loc'])}]: {e['msg']}"
                for e in exc.errors(include_url=False, include_input=False)
            ]
            raise ConfigError(str(path), errs) from None
        except ValueError as exc:
            raise ConfigError(str(path), [f"auth.keys_file: {exc}"]) from None

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, presented: str) -> Caller | None:
        digest = _digest(presented)
        found = None
        for known, caller in self._entries:  # no early exit: every lookup costs the same
            if hmac.compare_digest(known, digest):
                found = caller
        return found


class Keys:
    """The keys file as this replica knows it: reread every `auth.reload_interval_s`, so a key removed from the
    file (a Secret on Kubernetes) stops working without a restart (docs/operations.md, "Keys"). A file that does
    not validate leaves the keys before it in place; its errors name places, never the content."""

    def __init__(self, cfg: AuthConfig, limits: LimitsConfig, clock: Callable[[], float] = time.monotonic):
        self._path, self._limits, self._every, self._clock = cfg.keys_file, limits, cfg.reload_interval_s, clock
        self._text = self._read()
        # At start a bad file fails the replica: there are no keys to keep.
        self._ring = KeyRing.load(self._path, limits, self._text)
        self._checked = clock()

    def _read(self) -> bytes | None:
        try:
            return Path(self._path).read_bytes()
        except OSError:
            return None

    def _refresh(self) -> None:
        # One small read per interval, on the event loop: cheaper than a thread hop, and only when due.
        self._checked = self._clock()
        text = self._read()
        if text == self._text:
            return
        try:
            ring = KeyRing.load(self._path, self._limits, text)
        except ConfigError as exc:
            log.warning("keys file not reloaded, keeping the %d keys loaded before: %s", len(self._ring), exc)
        else:
            log.info("keys file reloaded: %d keys (was %d)", len(ring), len(self._ring))
            self._ring = ring
        self._text = text  # a bad file is reported once, not every interval

    def __len__(self) -> int:
        return len(self._ring)

    def authenticate(self, presented: str) -> Caller | None:
        if self._clock() - self._checked >= self._every:
            self._refresh()
        return self._ring.authenticate(presented)


def credentials(authorization: str) -> tuple[str, str]:
    """An `Authorization` header's (scheme, lowercased; token): ("", "") when there is none."""
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower(), token.strip()
