"""The llava-serve command line: run, check, render-k8s, tiny-model, capacity and accept (main() builds the parser)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import yaml

from serve import capacity
from serve.config import ENV_HOST, ENV_KEYS_FILE, ENV_PORT, ConfigError, ServeConfig, load_config


def check(cfg: ServeConfig) -> list[str]:
    """Validate a loaded config end to end without starting anything; returns 'field: message' errors."""
    from serve.app import build_app
    from serve.auth import KeyRing
    from serve.engine.vllm_engine import build_engine_args

    errors: list[str] = []
    if cfg.model.source.startswith("/") and not Path(cfg.model.source).is_dir():
        errors.append(
            f"model.source: no such directory {cfg.model.source} "
            "(the embedded default's model is built by `llava-serve tiny-model DIR`)"
        )
    for name in ("tls_certfile", "tls_keyfile"):
        path = getattr(cfg.http, name)
        if path is not None and not path.is_file():
            errors.append(f"http.{name}: no such file {path}")
    try:
        KeyRing.load(cfg.auth.keys_file, cfg.limits)
    except ConfigError as exc:
        errors += exc.errors
    try:
        build_engine_args(cfg)
    except Exception as exc:  # vLLM raises TypeError/ValueError for unknown or bad arguments
        errors.append(f"engine: vLLM rejects the engine arguments: {exc}")
    try:
        build_app(cfg)
    except Exception as exc:  # Serve validates deployment options when they are applied
        errors.append(f"engine_deployment/ingress: Ray Serve rejects the deployment options: {exc}")
    return errors


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
        errors = check(cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if errors:
        print(ConfigError(args.config, errors), file=sys.stderr)
        return 1
    e = cfg.engine
    print(
        f"{args.config}: OK — model {cfg.model.source} ({cfg.model.dtype}), max_model_len {e.max_model_len}, "
        f"max_num_seqs {e.max_num_seqs}, engine max_ongoing_requests {cfg.engine_max_ongoing_requests()}, "
        f"HTTP {cfg.http.host}:{cfg.http.port}, store {cfg.store.backend}"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    from serve.telemetry.console import cluster_env, driver_env

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if "ray" not in sys.modules:  # Ray reads these when it is imported (serve/telemetry/console.py)
        for name, value in driver_env(cfg.telemetry.log_format).items():
            os.environ.setdefault(name, value)
    # This process's environment is every local Ray process's: start_local need not give the cluster a
    # job environment of its own, which would keep Ray's prestarted workers from serving it.
    for name, value in cluster_env(cfg.telemetry.log_format).items():
        os.environ.setdefault(name, value)
    from serve.app import drain_local, start_local, stop_local

    url = f"{cfg.http.scheme}://{cfg.http.host}:{cfg.http.port}"
    stop, rc = threading.Event(), 0
    print(f"llava-serve: starting Ray, Serve and the engine for {cfg.model.served_name} ({args.config})", flush=True)
    try:
        start_local(cfg)
        # After ray.init, which installs a SIGTERM handler of its own that exits at once.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"llava-serve: ready on {url} (Ctrl-C stops)", flush=True)
        stop.wait()
        print("llava-serve: stopping; in-flight requests and running jobs finish first", flush=True)
        drain_local(cfg)
    except KeyboardInterrupt:  # Ctrl-C while starting
        print("llava-serve: interrupted while starting; stopping", flush=True)
        rc = 130
    finally:
        stop_local()
    print("llava-serve: stopped", flush=True)
    return rc


def _cmd_render_k8s(args: argparse.Namespace) -> int:
    from serve.k8s import KEY, render, replace_block

    manifest = Path(args.manifest)
    try:
        current = manifest.read_text()
        updated = replace_block(current, render(Path(args.config)))
    except (OSError, ValueError) as exc:  # ConfigError is a ValueError
        print(f"render-k8s: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if updated != current:
            print(f"{manifest}: {KEY} is stale; run `make k8s` (llava-serve render-k8s {args.config} {manifest})",
                  file=sys.stderr)
            return 1
        print(f"{manifest}: {KEY} matches {args.config}")
        return 0
    manifest.write_text(updated)
    print(f"{manifest}: {KEY} rendered from {args.config}")
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from serve.engine.tiny_model import build_tiny_model

    out = build_tiny_model(Path(args.dir), seed=args.seed)
    print(f"tiny LLaVA model written to {out}")
    return 0


def _cmd_capacity(args: argparse.Namespace) -> int:
    import json

    config = Path(args.config)
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    # The RayService deploys the production config: check it with that config, or when named.
    if args.no_k8s:
        manifest = None
    elif args.k8s is not None:
        manifest = Path(args.k8s)
    else:
        manifest = capacity.RAYSERVICE if config.resolve() == capacity.PRODUCTION_CONFIG.resolve() else None
    workload = capacity.Workload(rps=args.rps, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens)
    try:
        rayservice = capacity.load_rayservice(manifest) if manifest is not None else None
        est = capacity.estimate(cfg, workload)
    except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:
        print(f"capacity: {exc}", file=sys.stderr)
        return 1
    shown = None if manifest is None else str(manifest.relative_to(Path.cwd()) if manifest.is_absolute()
                                               and manifest.is_relative_to(Path.cwd()) else manifest)
    problems = capacity.check(cfg, workload, rayservice, est, manifest=shown or "")
    if args.json:
        print(json.dumps(capacity.to_json(est, problems, str(config), shown, workload), indent=2))
    else:
        print(capacity.render(est, problems, str(config), shown, workload, cfg.model.source))
    return 1 if problems else 0


def _cmd_accept(args: argparse.Namespace) -> int:
    import json

    from serve import accept

    try:
        listen = accept.parse_listen(args.webhook_listen) if args.webhook_listen else None
        opts = accept.Options(
            url=args.url, key=args.key, second_key=args.second_key, webhook_listen=listen,
            webhook_url=args.webhook_url or (accept.default_webhook_url(listen) if listen else None),
            metrics_url=args.metrics_url, load_seconds=args.load_seconds, concurrency=args.concurrency,
            load_requests=args.load_requests, max_tokens=args.max_tokens, timeout=args.timeout,
            min_ratio=args.min_ratio, config=Path(args.config))
    except ValueError as exc:
        print(f"accept: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(accept.header(opts.url), flush=True)
    try:
        report = accept.run(opts, (lambda c: None) if args.json else (lambda c: print(accept.row(c), flush=True)))
    except ValueError as exc:  # the webhook receiver cannot listen
        print(f"accept: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json(), indent=2) if args.json else "\n".join(accept.footer(report)))
    return 0 if report.ok else 1


DIST = "llava-serve"  # pyproject.toml [project] name
CONFIG_HELP = "a config YAML, e.g. configs/local-cpu.yaml; docs/configuration.md lists every field"
PROD = "configs/llava-1.5-13b-l40s.yaml"
# The production config's keys file is a mounted Secret: elsewhere, check it with the example keys.
PROD_CHECK = f"{ENV_KEYS_FILE}=configs/keys.local.yaml llava-serve check {PROD}"

DESCRIPTION = """\
llava-serve serves LLaVA-1.5 (an image and a prompt in, text out) behind fal's and Eachlabs' APIs and an
OpenAI-compatible route, on Ray Serve with vLLM as the engine. One YAML config describes the whole
deployment: 'run' serves it on a local Ray, 'check' validates it without starting anything, 'accept'
checks a live deployment end to end, and the other commands write the Kubernetes manifest's Serve config,
the tiny test model, and a capacity plan."""

EPILOG = f"""\
examples:
  make serve                                  what most people run: installs, builds the tiny model,
                                              then runs llava-serve run configs/local-cpu.yaml
  llava-serve run configs/local-cpu.yaml      serve the embedded default on http://127.0.0.1:8000
  llava-serve check {PROD}
                                              validate the production config (its keys file is a
                                              Kubernetes Secret; elsewhere prefix {ENV_KEYS_FILE}=...)
  llava-serve COMMAND --help                  what one command does, with examples

Every config field: docs/configuration.md."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST)
    except PackageNotFoundError:
        return "unknown"


def _env_overrides() -> str:
    """The config fields the environment overrides (serve/config.py parse_config), one per line."""
    rows = ((ENV_PORT, "http.port"), (ENV_HOST, "http.host"),
            (ENV_KEYS_FILE, "auth.keys_file (a path relative to where the command runs)"))
    return "\n".join(f"  {env:<23}{field}" for env, field in rows)


def _subcommand(sub, name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _production_config() -> str:
    """The production config, relative to where the command runs when it is below it (as help shows it)."""
    prod = capacity.PRODUCTION_CONFIG
    return str(prod.relative_to(Path.cwd()) if prod.is_relative_to(Path.cwd()) else prod)


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not above 0")
        return value
    return parse


def _accept_parser(sub) -> None:
    from dataclasses import fields

    from serve.accept import CHECK_ADMISSIONS, Options

    d = argparse.Namespace(**{f.name: f.default for f in fields(Options)})
    p = _subcommand(
        sub, "accept", "check a live deployment end to end and measure a short load",
        "Exercise a running deployment at URL with KEY, over plain HTTP, and print one row per check:\n"
        "health and readiness; fal run, stream, queue (submit, status, result, cancel) and webhooks; Eachlabs\n"
        "create, poll, cancel and webhooks; OpenAI models and chat completions; a wrong key's 401; the rate-limit\n"
        "headers; /metrics; then a short streamed load whose TTFT, output tokens/s and requests/s are compared\n"
        "with what the capacity model gives one L40S replica (docs/capacity.md). Exits 1 if any check fails.\n\n"
        f"Budget: the checks spend {CHECK_ADMISSIONS} of KEY's rate, the load at most --load-requests more and\n"
        f"never more than the key has left, at most --concurrency at once: {CHECK_ADMISSIONS + d.load_requests} "
        f"of the default 60 a minute\nand {d.concurrency} of 10 at once, so one run fits one key. The window is a "
        "rolling minute: a run right\nafter another gets a smaller load. Use a key of its own, not one clients "
        "use.\ndocs/operations.md, 'Acceptance check', says what each row proves.",
        "examples:\n"
        "  llava-serve accept --url https://llava.example.com --key KEY\n"
        "  llava-serve accept --url http://127.0.0.1:8000 --key local-test-key --second-key local-each-key\n"
        "  llava-serve accept --url URL --key KEY --webhook-listen 10.0.0.5:9000 --min-ratio 0.5 --json",
    )
    p.add_argument("--url", required=True, help="the deployment's base URL, as clients reach it")
    p.add_argument("--key", required=True, help="an API key of its keys file (never printed)")
    p.add_argument("--second-key", help="another key: admitted before and after the first key's checks, to show "
                   "the keys' rate windows are separate (2 of its admissions)")
    p.add_argument("--webhook-listen", metavar="HOST:PORT", help="receive the fal and Eachlabs webhooks here "
                   "(skipped without it); the deployment must reach it and its SSRF guard admit it")
    p.add_argument("--webhook-url", help="the receiver as the deployment reaches it (default http://HOST:PORT)")
    p.add_argument("--metrics-url", help="a Prometheus endpoint to scrape, e.g. a Ray pod's http://POD:8080/metrics "
                   "(skipped without it); the API port's own /metrics is always reported")
    p.add_argument("--load-seconds", type=_positive(float), default=d.load_seconds,
                   help=f"how long the load starts requests (default {d.load_seconds:g})")
    p.add_argument("--concurrency", type=_positive(int), default=d.concurrency,
                   help=f"load requests in flight at once, at most the key's cap (default {d.concurrency})")
    p.add_argument("--load-requests", type=_positive(int), default=d.load_requests,
                   help=f"the most load requests (default {d.load_requests}; fewer if the key has fewer left)")
    p.add_argument("--max-tokens", type=_positive(int), default=d.max_tokens,
                   help=f"output tokens per load request (default {d.max_tokens})")
    p.add_argument("--timeout", type=_positive(float), default=d.timeout,
                   help=f"seconds any one call, poll or webhook may take (default {d.timeout:g})")
    p.add_argument("--min-ratio", type=_positive(float), help="fail when measured output tokens/s or requests/s "
                   "is under this share of the model's (default: report the ratios only)")
    p.add_argument("--config", default=_production_config(),
                   help="the deployment's config, for the capacity model (default: the production config)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_cmd_accept)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-serve", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"llava-serve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    p = _subcommand(
        sub, "run", "serve a config on a local Ray until Ctrl-C",
        "Start a local Ray and serve CONFIG on it: Serve's HTTP proxy on http.host:http.port, the ingress\n"
        "and the vLLM engine. Ctrl-C or SIGTERM drains (in-flight requests and running jobs finish first),\n"
        "then stops everything.\n\n"
        f"The environment overrides three config fields:\n{_env_overrides()}",
        "examples:\n"
        "  llava-serve run configs/local-cpu.yaml                   needs the tiny model (make tiny-model)\n"
        f"  {ENV_PORT}=8080 {ENV_HOST}=0.0.0.0 llava-serve run configs/local-cpu.yaml\n"
        "  make serve                                               installs and builds it first",
    )
    p.add_argument("config", help=CONFIG_HELP)
    p.set_defaults(func=_cmd_run)
    p = _subcommand(
        sub, "check", "validate a config end to end without starting anything",
        "Validate CONFIG without starting anything: every field (unknown keys are errors), the keys file,\n"
        "the model directory, vLLM's engine arguments and the Serve deployment options. Prints one OK line,\n"
        "or each problem as 'field.path: message' and exits 1. The environment overrides apply:\n"
        f"{_env_overrides()}",
        "examples:\n"
        "  llava-serve check configs/local-cpu.yaml\n"
        f"  {PROD_CHECK}\n"
        "  make check CONFIG=configs/my.yaml",
    )
    p.add_argument("config", help=CONFIG_HELP)
    p.set_defaults(func=_cmd_check)
    p = _subcommand(
        sub, "render-k8s", "write a config's Serve config into a RayService's serveConfigV2",
        "Render CONFIG as a Ray Serve config and write it into the 'serveConfigV2: |' block of a RayService\n"
        "manifest, so the cluster deploys what the config says (docs/kubernetes.md). With --check, change\n"
        "nothing and exit 1 if the block is stale.",
        "examples:\n"
        f"  llava-serve render-k8s {PROD} k8s/rayservice.yaml\n"
        f"  llava-serve render-k8s --check {PROD} k8s/rayservice.yaml\n"
        "  make k8s                        the first, for the production config",
    )
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("manifest", help="the RayService YAML whose 'serveConfigV2: |' block is replaced")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if the block is stale")
    p.set_defaults(func=_cmd_render_k8s)
    p = _subcommand(
        sub, "tiny-model", "write the tiny random LLaVA-1.5-architecture model",
        "Write a tiny model with LLaVA-1.5's architecture and random weights into DIR: what\n"
        "configs/local-cpu.yaml serves (from .cache/tiny-llava), so the whole stack runs on a CPU.\n"
        "Its answers are meaningless; the same seed writes the same model.",
        "example:\n"
        "  llava-serve tiny-model .cache/tiny-llava      what make tiny-model runs",
    )
    p.add_argument("dir", help="the directory to write the model into, e.g. .cache/tiny-llava")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.set_defaults(func=_cmd_tiny_model)
    d = capacity.DEFAULT_WORKLOAD
    p = _subcommand(
        sub, "capacity", "size a deployment from the capacity model and check a config (and k8s/) against it",
        "The capacity model of docs/capacity.md. From the L40S's datasheet, LLaVA-1.5-13B's\n"
        "architecture, the config and a workload: the KV-bound concurrency, the decode-step floor, tokens/s\n"
        "and requests/s per engine replica, and the GPUs and ingress CPUs the workload needs (from the ingress\n"
        "costs that make bench measured). Each figure says whether it is from the datasheet, the config, the\n"
        "workload, an assumption, a measurement, or computed from those. Exits 1 when the config, or the\n"
        "RayService that deploys it, disagrees with the model, listing each disagreement.",
        "examples:\n"
        "  llava-serve capacity --rps 6 --output-tokens 300\n"
        f"  llava-serve capacity {PROD} --json",
    )
    p.add_argument("config", nargs="?", default=_production_config(),
                   help="the config to size and check (default: the production config)")
    p.add_argument("--rps", type=float, default=d.rps, help=f"workload requests per second (default {d.rps:g})")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens,
                   help=f"text tokens per prompt, template included, besides the 576 image tokens "
                   f"(default {d.prompt_tokens})")
    p.add_argument("--output-tokens", type=int, default=d.output_tokens,
                   help=f"output tokens per request (default {d.output_tokens})")
    p.add_argument("--k8s", metavar="MANIFEST", help="the RayService to check as well (default: "
                   "k8s/rayservice.yaml when CONFIG is the production config it is rendered from)")
    p.add_argument("--no-k8s", action="store_true", help="check the config only")
    p.add_argument("--json", action="store_true", help="print the figures and problems as JSON")
    p.set_defaults(func=_cmd_capacity)
    _accept_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
