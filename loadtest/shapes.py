"""Load shapes for `LOADTEST_SHAPE=steady|step|spike` (locustfile.py picks one). Sized by LOADTEST_USERS (the
peak) and LOADTEST_DURATION_S (the whole run); each returns None at the end, which stops the test."""

from __future__ import annotations

import os

from locust import LoadTestShape


def _users() -> int:
    return int(os.environ.get("LOADTEST_USERS", "10"))


def _duration() -> float:
    return float(os.environ.get("LOADTEST_DURATION_S", "60"))


class Steady(LoadTestShape):
    """The peak, all the way: a plateau to measure."""

    def tick(self):
        return (_users(), _users()) if self.get_run_time() < _duration() else None


class Step(LoadTestShape):
    """A quarter of the peak more every quarter of the run: where do latency and 429s begin?"""

    def tick(self):
        t, d = self.get_run_time(), _duration()
        if t >= d:
            return None
        step = int(4 * t // d) + 1
        return max(1, _users() * step // 4), _users()


class Spike(LoadTestShape):
    """A fifth of the peak, the whole peak for a sixth of the run in the middle, then back: does the
    service shed the burst with 429s and recover?"""

    def tick(self):
        t, d = self.get_run_time(), _duration()
        if t >= d:
            return None
        base = max(1, _users() // 5)
        return (_users(), _users()) if d * 5 / 12 <= t < d * 7 / 12 else (base, _users())


SHAPES = {"steady": Steady, "step": Step, "spike": Spike}
