"""`llava-serve run | check | render-k8s | tiny-model | capacity`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import yaml

from serve import capacity
from serve.config import ConfigError, ServeConfig, load_config


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
    from serve.app import drain_local, start_local, stop_local

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    stop = threading.Event()
    try:
        start_local(cfg)
        # After ray.init, which installs a SIGTERM handler of its own that exits at once.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"llava-serve: ready on {cfg.http.scheme}://{cfg.http.host}:{cfg.http.port} (Ctrl-C stops)", flush=True)
        stop.wait()
        print("llava-serve: stopping; in-flight requests and running jobs finish first", flush=True)
        drain_local(cfg)
    finally:
        print("llava-serve: shutting down", flush=True)
        stop_local()
    return 0


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llava-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="serve a config on a local Ray until Ctrl-C")
    p.add_argument("config")
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser("check", help="validate a config end to end without starting anything")
    p.add_argument("config")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("render-k8s", help="write a config's Serve config into a RayService's serveConfigV2")
    p.add_argument("config")
    p.add_argument("manifest", help="the RayService YAML whose 'serveConfigV2: |' block is replaced")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if the block is stale")
    p.set_defaults(func=_cmd_render_k8s)
    p = sub.add_parser("tiny-model", help="write the tiny random LLaVA-1.5-architecture model")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_model)
    d = capacity.DEFAULT_WORKLOAD
    p = sub.add_parser(
        "capacity",
        help="size a deployment from the capacity model and check a config (and k8s/) against it",
        description="The capacity model of docs/capacity.md. From the L40S's datasheet, LLaVA-1.5-13B's\n"
        "architecture, the config and a workload: the KV-bound concurrency, the decode-step floor, tokens/s\n"
        "and requests/s per engine replica, and the GPUs and ingress CPUs the workload needs (from the ingress\n"
        "costs `make bench` measured). Each figure says whether it is from the datasheet, the config, the\n"
        "workload, an assumption, a measurement, or computed from those. Exits 1 when the config, or the\n"
        "RayService that deploys it, disagrees with the model, listing each disagreement.",
        epilog="example: llava-serve capacity --rps 6 --output-tokens 300\n"
        "         llava-serve capacity configs/llava-1.5-13b-l40s.yaml --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", nargs="?", default=str(capacity.PRODUCTION_CONFIG.relative_to(Path.cwd()))
                   if capacity.PRODUCTION_CONFIG.is_relative_to(Path.cwd()) else str(capacity.PRODUCTION_CONFIG),
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
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
