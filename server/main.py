"""`longrope serve`: our flags, then anything else goes to vLLM's engine arguments."""

from __future__ import annotations

import argparse
import logging
import sys

from rope_ext.selection import Policy


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longrope serve",
        description="OpenAI-compatible server; flags not listed here are passed to vLLM's engine "
        "(e.g. --dtype float32 --enforce-eager --tensor-parallel-size 2). Every flag is also "
        "an environment variable LONGROPE_<NAME>.",
    )
    parser.add_argument("--model", help="model directory (default: the prepared SmolLM2-135M-Instruct)")
    parser.add_argument("--factors", help="factor file (default: shipped ladder, or the model's longrope config)")
    parser.add_argument("--served-model-name", dest="served_model_name")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--api-key", dest="api_keys", action="append", help="accepted key; repeat for several")
    parser.add_argument("--rope-policy", dest="rope_policy", choices=[p.value for p in Policy])
    parser.add_argument("--max-body-bytes", dest="max_body_bytes", type=int)
    parser.add_argument("--drain-timeout", dest="drain_timeout", type=float,
                        help="seconds running requests may finish after SIGTERM")
    return parser


def serve(argv: list[str]) -> int:
    """Exit 0 after a clean stop; 2 for a bad flag or factor file (before anything starts); 1 when
    the engine cannot start (the reason is logged to stderr)."""
    import uvicorn

    from server.app import create_app
    from server.engine import ServedModel, build_engine_args, export_factors
    from server.settings import ServerSettings

    args, engine_argv = build_parser().parse_known_args(argv)
    settings = ServerSettings(**{k: v for k, v in vars(args).items() if v is not None})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        export_factors(settings)
    except ValueError as exc:  # FactorFileError names the field
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = ServedModel(settings, build_engine_args(settings, engine_argv))
    config = uvicorn.Config(create_app(settings, model), host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=settings.drain_timeout)
    server = uvicorn.Server(config)
    model.on_start_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if model.start_error is not None:
        print(f"error: the engine failed to start: {model.start_error}", file=sys.stderr)
        return 1
    return 0
