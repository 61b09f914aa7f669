"""Every vLLM name `longrope serve` relies on beyond the plugin's (rope_ext/vllm_plugin/vllm_internals.py),
with the versions that have it. Checked before it parses its arguments: it runs vLLM's own OpenAI server with
our engine client in place of vLLM's, so a vLLM that moved one of these stops at start naming it. Names that
moved between versions (vLLM's serve CLI arguments, ``launchers`` in 0.32, ``common`` from 0.33) are
listed once per place, and the code imports them through :func:`load`."""

from __future__ import annotations

from typing import Any

from rope_ext.vllm_plugin.vllm_internals import SUPPORTED_VLLM, Internal, applies, lookup

_CLI_ARGS = {("0.32.0",): "vllm.entrypoints.launchers.cli_args",
             tuple(v for v in SUPPORTED_VLLM if v != "0.32.0"): "vllm.entrypoints.common.cli_args"}
_ENTRY = "vllm.entrypoints.launchers.api_server.entry"

SERVER_INTERNALS = (
    *(Internal(module, "make_arg_parser", "builds `longrope serve`'s parser on it", ("parser",), versions)
      for versions, module in _CLI_ARGS.items()),
    *(Internal(module, "validate_parsed_serve_args", "checks the parsed flags", ("args",), versions)
      for versions, module in _CLI_ARGS.items()),
    Internal("vllm.entrypoints.launchers.launcher", "setup_server", "binds the listening socket",
             ("args", "reuse_port")),
    Internal(_ENTRY, "build_async_engine_client", "starts the AsyncLLM", ("args",)),
    Internal(_ENTRY, "build_and_serve",
             "builds vLLM's app over our engine client and serves it (our middleware via --middleware)",
             ("engine_client", "listen_address", "sock", "args")),
    Internal("vllm.v1.metrics.prometheus", "get_prometheus_registry", "adds our metrics to vLLM's /metrics"),
    Internal("vllm.engine.protocol", "EngineClient",
             "serves its interface: LadderEngineClient delegates every name it does not override to the AsyncLLM "
             "(__getattr__), so a method vLLM adds to it reaches the engine unchanged"),
    Internal("vllm.engine.protocol", "EngineClient.generate", "overrides it: admission, pinning, promotion",
             ("prompt", "sampling_params", "request_id")),
    Internal("vllm.engine.protocol", "EngineClient.check_admission", "overrides it: 503 while draining"),
    Internal("vllm.engine.protocol", "EngineClient.check_health", "overrides it: /health is 503 while draining"),
    Internal("vllm.engine.protocol", "EngineClient.shutdown", "overrides it: SIGTERM lets running requests finish"),
    Internal("vllm.engine.protocol", "EngineClient.abort",
             "overrides it: an abort by request id reaches a promoted choice's segments and side prefills",
             ("request_id",)),
    Internal("vllm.v1.engine.async_llm", "AsyncLLM.tokenizer", "reads it: the detokenizer a stop string is checked by"),
    Internal("vllm.v1.engine.detokenizer", "IncrementalDetokenizer.from_new_request",
             "builds one per promotable choice with stop strings: vLLM's stop rule over the whole choice",
             ("tokenizer", "request")),
    Internal("vllm.v1.engine.detokenizer", "IncrementalDetokenizer.update", "calls it with every token",
             ("new_token_ids", "stop_terminated")),
    Internal("vllm.v1.engine.detokenizer", "IncrementalDetokenizer.get_next_output_text",
             "calls it: the text to pass on, held back as vLLM holds it", ("finished", "delta")),
    Internal("vllm.v1.engine.detokenizer", "IncrementalDetokenizer.output_token_ids",
             "reads it: the tokens kept once a stop string ends the choice"),
    *(Internal("vllm.v1.engine", f"EngineCoreRequest.{name}",
               "the detokenizer reads it: given from the choice's own prompt and parameters", attribute=True)
      for name in ("request_id", "sampling_params", "prompt_token_ids", "prompt_embeds")),
    Internal("vllm.outputs", "RequestOutput.metrics",
             "reads it: a segment's queue time and its prefill's rate (server/choices.py)", attribute=True),
    Internal("vllm.outputs", "RequestOutput.num_cached_tokens",
             "reads it: what a switch's prefill found cached; a prefill's uncached tokens", attribute=True),
    *(Internal("vllm.v1.metrics.stats", f"RequestStateStats.{name}", f"reads it: {use}", attribute=True)
      for name, use in (("queued_ts", "the queue time"), ("scheduled_ts", "the queue time, a prefill's start"),
                        ("first_token_ts", "a prefill's end"))),
    Internal("vllm.v1.engine.async_llm", "AsyncLLM.errored", "reads it: an engine that died makes the server exit 1"),
    Internal("vllm.config", "CacheConfig.enable_prefix_caching",
             "reads it (AsyncLLM.vllm_config.cache_config): side prefills are off without prefix caching",
             attribute=True),
    Internal("vllm.config", "CacheConfig.block_size",
             "reads it (AsyncLLM.vllm_config.cache_config): side prefills add whole KV blocks (only those are cached)",
             attribute=True),
    Internal("vllm.v1.engine.core_client", "BackgroundResources.engine_manager",
             "reads it (AsyncLLM.engine_core.resources): the engine processes whose exit codes say why it died",
             attribute=True),
    Internal("vllm.v1.engine.utils", "CoreEngineProcManager.finished_procs", "calls it: those exit codes"),
    Internal("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware.verify_token",
             "calls it: the API key check on every route but the probes (server/api_keys.py)", ("headers",)),
    Internal("vllm.envs", "VLLM_API_KEY", "reads it: the key when --api-key is not given, as vLLM does"),
)


def load(name: str) -> Any:
    """The installed vLLM's object for the entry called ``name`` (the one listed for this version)."""
    for internal in SERVER_INTERNALS:
        if internal.name == name and applies(internal):
            return lookup(internal)
    raise KeyError(f"{name} is not in server.vllm_internals for this vLLM")
