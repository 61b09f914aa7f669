"""`longrope serve`: vLLM's own OpenAI server (its parser, app and launcher) over our engine client.

Every `vllm serve` flag works; ours (the "longrope-serve" group in ``build_parser``: the factor file,
the policy, side prefills and the start rule, the body limits, the metrics key) are added to vLLM's
parser, so ``longrope serve --help`` lists them all. Any flag can also come from
an environment variable ``LONGROPE_<DEST>`` (``LONGROPE_PORT=9000``, ``LONGROPE_API_KEY=a,b``),
for container images. What fails at start-up ends the process: 2 for a bad flag or factor file,
1 when the engine cannot start or dies later, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rope_ext.environment import SERVE_PREFIX, parse_switch
from rope_ext.factors import FactorFileError, Ladder
from rope_ext.models.smollm2 import DEFAULT_LADDER, default_model_dir
from rope_ext.selection import Policy

OUR_MIDDLEWARE = "server.middleware.LongRopeMiddleware"


def build_parser() -> argparse.ArgumentParser:
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from server.vllm_internals import load

    parser = load("make_arg_parser")(FlexibleArgumentParser(
        prog="longrope serve",
        description="vLLM's OpenAI-compatible server with a factor set chosen per request. Every "
        "`vllm serve` flag works; every flag is also an environment variable LONGROPE_<DEST>."))
    ours = parser.add_argument_group("longrope-serve")
    ours.add_argument("--factors", type=Path,
                      help="factor file (default: the shipped ladder for the default model, else the model's "
                      "own longrope config)")
    ours.add_argument("--rope-policy", choices=[p.value for p in Policy], default=Policy.DYNAMIC.value,
                      help="dynamic: start in the smallest set that holds the prompt and promote; budget: start "
                      "where prompt + max_tokens fits and stay")
    ours.add_argument("--side-prefill-max-lead", type=int, default=4096,
                      help="promotion without a stall: up to this many tokens before a window, prefill the next set "
                      "beside the decode (a one-token side request), so the switch finds it in the prefix cache; "
                      "0 turns it off (it is off without prefix caching)")
    ours.add_argument("--rope-start-rule", choices=["lead", "window"], default="lead",
                      help="lead: a request with too little room in its start set to hide the next set's prefill "
                      "starts in the next set; window: the smallest set that holds the prompt (never a bigger one)")
    ours.add_argument("--max-body-bytes", type=int, default=2_000_000,
                      help="larger request bodies get 413, on every route, sized or chunked")
    ours.add_argument("--max-body-seconds", type=float, default=60.0,
                      help="a request body that takes longer to arrive gets 408 (a client dripping it holds a slot)")
    ours.add_argument("--metrics-require-api-key", action="store_true",
                      help="/metrics asks for the API key too (default: open for Prometheus, like the /health and "
                      "/ping probes; every other route needs the key when --api-key is set)")
    # Loopback unless told otherwise (vLLM's default listens on every interface); SIGTERM drains for 30 s.
    defaults = {"model": str(default_model_dir()), "host": "127.0.0.1", "shutdown_timeout": 30}
    if current_platform.is_cpu():
        # vLLM's CPU default, bfloat16 with torch.compile, flips close first tokens (SmolLM2
        # answers "L'Étoile…" instead of "Paris"); float32 matches transformers.
        defaults["dtype"] = "float32"
    parser.set_defaults(**defaults)
    parser.set_defaults(**_environment_defaults(parser))
    return parser


def _environment_defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    """LONGROPE_<DEST> for any flag, converted as the flag would be (lists: comma-separated)."""
    found: dict[str, object] = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        variable = SERVE_PREFIX + action.dest.upper()
        value = os.environ.get(variable)
        if value is None or not action.option_strings:
            continue
        items = [v.strip() for v in value.split(",")] if action.nargs in ("+", "*") else [value]
        # a switch (--enforce-eager) takes true/false words; a flag with a value converts as the flag would
        convert = parse_switch if action.nargs == 0 else action.type if callable(action.type) else str
        try:
            converted = [convert(v) for v in items]
        except (TypeError, ValueError) as exc:
            parser.error(f"{variable}={value!r}: {exc}")
        if action.choices is not None and any(v not in action.choices for v in converted):
            parser.error(f"{variable}={value!r}: choose from {', '.join(map(str, action.choices))}")
        found[action.dest] = converted if action.nargs in ("+", "*") else converted[0]
    return found


def resolve_ladder(args: argparse.Namespace) -> Ladder:
    """The ladder served (--factors, the shipped one for the default model, else the model's own
    longrope config), from the same per-process source the plugin reads."""
    from transformers import AutoConfig

    from rope_ext.vllm_plugin.model_ladder import ladder_for_model

    if args.factors is None and Path(args.model).resolve() == default_model_dir().resolve():
        args.factors = DEFAULT_LADDER
    ladder = ladder_for_model(AutoConfig.from_pretrained(args.model), args.factors)
    if ladder is None:
        raise FactorFileError(f"{args.model} has no longrope config; give a factor file with --factors")
    return ladder


def serve(argv: list[str]) -> int:
    """Exit 0 after a clean stop; 2 for a bad flag or factor file; 1 when the engine cannot start or dies."""
    import uvloop

    from rope_ext.vllm_plugin.vllm_internals import check_internals
    from server.vllm_internals import SERVER_INTERNALS

    check_internals(SERVER_INTERNALS)
    from server.vllm_internals import load

    args = build_parser().parse_args(argv)  # a bad flag exits 2 here, with argparse's message
    if args.model_tag is not None:
        args.model = args.model_tag
    if (args.api_server_count or 1) > 1 or args.headless or args.grpc:
        # One API process: the engine client's regimes, drain and metrics live in it.
        print("error: longrope serve runs one HTTP API process: drop --api-server-count, --headless and --grpc "
              "(scale with replicas, or --data-parallel-size within one)", file=sys.stderr)
        return 2
    try:
        ladder = resolve_ladder(args)
    except (FactorFileError, ValueError) as exc:  # names the field that is wrong
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.max_model_len is None:
        args.max_model_len = ladder.max_window
    if not args.served_model_name:
        args.served_model_name = [Path(args.model).name]
    if args.factors is not None:
        from rope_ext.vllm_plugin.model_ladder import carry_factors

        carry_factors(args, args.factors)
    args.middleware = [*args.middleware, OUR_MIDDLEWARE]
    load("validate_parsed_serve_args")(args)
    try:
        died = uvloop.run(_run(args, ladder))
    except Exception as exc:  # noqa: BLE001 - vLLM logged the details; say why, exit non-zero
        print(f"error: the engine failed to start: {exc}", file=sys.stderr)
        return 1
    if died is not None:
        print(f"error: the engine died: {died}", file=sys.stderr)
        return 1
    return 0


async def _run(args: argparse.Namespace, ladder: Ladder) -> str | None:
    """vLLM's ``run_server``, with our engine client in place of its AsyncLLM; returns why the engine
    died, or None after a clean stop (SIGTERM, SIGINT)."""
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve, build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    from server.engine_client import LadderEngineClient
    from server.metrics import ServerMetrics

    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine:
        metrics = ServerMetrics(args.served_model_name[0])
        metrics.expose(get_prometheus_registry())
        client = LadderEngineClient(engine, ladder, Policy(args.rope_policy), metrics, args.side_prefill_max_lead,
                                    args.rope_start_rule == "lead")
        shutdown = await build_and_serve(client, listen_address, sock, args)
        died = client.death_reason()  # read before the engine is shut down below
    try:
        await shutdown
    finally:
        sock.close()
    return died
