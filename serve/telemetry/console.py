"""The console of `llava-serve run`: what the local Ray, Serve and vLLM print there.

With `telemetry.log_format: text` (configs/local-cpu.yaml) it is the development console: a line that
says what is starting, `ready on URL`, one short line per request, our own warnings and errors, Ray's,
Serve's and vLLM's warnings and errors that are not about the machine, and a two-line stop. Everything
else those libraries print at start-up is about a machine a developer cannot change (no tcmalloc, no
Triton, token auth, NUMA binding, ...): this module turns it off with the knobs each library documents,
never by filtering text. With `json` (the default, and production on KubeRay) nothing here applies
except `driver_env`'s first entry, which changes no behaviour.

Each knob, what it quiets, and where it is read:
- RAY_AUTH_MODE=token: Ray's default for a new local cluster, stated, so ray.init does not warn that it
  is the default. Read when `ray` is imported: set before (serve/cli.py).
- RAY_DEDUP_LOGS=0: every line reaches the console; Ray would otherwise fold lines alike but for their
  numbers across replicas (two replicas' access lines within 5 s) into `[repeated 2x across cluster]`.
- RAY_DISABLE_WORKER_LOG_PREFIX=1: no `(ServeReplica:llava:Ingress pid=1234)` before each line.
- RAY_FLUSH_DRIVER_LOGS=1: the replicas' lines reach a pipe or a file (`make serve | tee`, the tests) as
  they come, not when a buffer fills.
- ray.init(logging_level=WARNING), and the driver's `ray.serve` logger at WARNING: Ray's and Serve's
  INFO lines in this process ("Started a local Ray instance", "Deploying ...", "Deleting app ...").
- serve.start(logging_config=LoggingConfig(log_level="WARNING")): the Serve controller's and proxy's
  INFO lines ("Adding 1 replica", "Got updated endpoints", ...). A replica's Serve lines follow its
  deployment's logging_config (serve/deployment.py deployment_options): one INFO line per ingress
  replica at start ("Started <...SharedRouterLongPollClient...>") unless its log_level is WARNING there.
- In every process of the local cluster, CLUSTER_ENV below: `llava-serve run` puts it in its own
  environment, which Ray's processes inherit (start_local gives it to the cluster as the job's environment
  when its caller did not). A variable already set is left alone: `VLLM_LOGGING_LEVEL=INFO make serve`
  brings vLLM's lines back.

What a level turns off is not written to Ray's log files (session_latest/logs) either: `log_format: json`
shows it all. What stays: vLLM's "Triton is installed, but doesn't include CPU backend", once per vLLM
process (2 lines). vLLM logs it while it is imported, before it sets up its logging, so no level reaches
it (Python's last-resort handler prints it); only a text filter would.
"""

from __future__ import annotations

import logging
import os

# Imported by serve/cli.py before Ray is: nothing here imports Ray (serve.telemetry.access does).
QUIET_LEVEL = "WARNING"

CLUSTER_ENV = {
    # vLLM: ERROR keeps a failing engine's cause and traceback; its INFO lines (~30 per start and stop)
    # and its CPU warnings (no tcmalloc/libiomp, no Triton, torch.set_num_threads, eager mode, ...) go.
    "VLLM_LOGGING_LEVEL": "ERROR",
    # PyTorch's C++ warnings (`[W... utils.cpp:68] Warning: NUMA binding ...`).
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    # Libraries' deprecation notices to their own callers (torch.distributed.reduce_op in vLLM, ...).
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    # Serve warns when a replica takes more than 30 s to start; a cold vLLM start on a small machine
    # takes about that long every time. Still warned, at 2 minutes: a replica that cannot be placed
    # (more CPUs asked than the machine has) or an engine that hangs.
    "RAY_SERVE_SLOW_STARTUP_WARNING_S": "120",
}


def is_console(log_format: str) -> bool:
    return log_format == "text"


def driver_env(log_format: str) -> dict[str, str]:
    """Environment this process needs before it imports `ray` (Ray reads these at import)."""
    env = {"RAY_AUTH_MODE": "token"}
    if is_console(log_format):
        env.update(RAY_DEDUP_LOGS="0", RAY_DISABLE_WORKER_LOG_PREFIX="1", RAY_FLUSH_DRIVER_LOGS="1")
    return env


def cluster_env(log_format: str) -> dict[str, str]:
    """Environment for every process of the local cluster, less what this process's environment already
    sets (the cluster's processes inherit it)."""
    if not is_console(log_format):
        return {}
    return {k: v for k, v in CLUSTER_ENV.items() if k not in os.environ}


def driver_logging_level(log_format: str) -> int:
    """ray.init's logging_level for this process's `ray` logger."""
    return logging.getLevelName(QUIET_LEVEL) if is_console(log_format) else logging.INFO


def quiet_serve_in_driver(log_format: str) -> None:
    """Serve's own logger in this process (configured at `import ray.serve`, at INFO)."""
    if is_console(log_format):
        logging.getLogger("ray.serve").setLevel(QUIET_LEVEL)


def serve_system_logging(log_format: str) -> dict[str, str] | None:
    """serve.start's logging_config: the Serve controller's and proxies' log level."""
    return {"log_level": QUIET_LEVEL} if is_console(log_format) else None
