"""Every vLLM name `longrope serve` relies on beyond the plugin's (rope_ext/vllm_plugin/vllm_internals.py),
checked before it parses its arguments: it runs vLLM's own OpenAI server with our engine client in
place of vLLM's, so a vLLM that moved one of these stops at start naming it."""

from __future__ import annotations

from rope_ext.vllm_plugin.vllm_internals import Internal

SERVER_INTERNALS = (
    Internal("vllm.entrypoints.launchers.cli_args", "make_arg_parser", "builds `longrope serve`'s parser on it"),
    Internal("vllm.entrypoints.launchers.cli_args", "validate_parsed_serve_args", "checks the parsed flags"),
    Internal("vllm.entrypoints.launchers.launcher", "setup_server", "binds the listening socket"),
    Internal("vllm.entrypoints.launchers.api_server.entry", "build_async_engine_client", "starts the AsyncLLM"),
    Internal("vllm.entrypoints.launchers.api_server.entry", "build_and_serve",
             "builds vLLM's app over our engine client and serves it (our middleware via --middleware)"),
    Internal("vllm.v1.metrics.prometheus", "get_prometheus_registry", "adds our metrics to vLLM's /metrics"),
    Internal("vllm.engine.protocol", "EngineClient.generate", "overrides it: admission, pinning, promotion"),
    Internal("vllm.engine.protocol", "EngineClient.check_admission", "overrides it: 503 while draining"),
    Internal("vllm.engine.protocol", "EngineClient.check_health", "overrides it: /health is 503 while draining"),
    Internal("vllm.engine.protocol", "EngineClient.shutdown", "overrides it: SIGTERM lets running requests finish"),
    Internal("vllm.v1.engine.async_llm", "AsyncLLM.errored", "reads it: an engine that died makes the server exit 1"),
    Internal("vllm.config", "CacheConfig.enable_prefix_caching",
             "reads it (AsyncLLM.vllm_config.cache_config): side prefills are off without prefix caching"),
    Internal("vllm.v1.engine.core_client", "BackgroundResources.engine_manager",
             "reads it (AsyncLLM.engine_core.resources): the engine processes whose exit codes say why it died"),
    Internal("vllm.v1.engine.utils", "CoreEngineProcManager.finished_procs", "calls it: those exit codes"),
    Internal("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware.verify_token",
             "calls it: the API key check on every route but the probes (server/api_keys.py)"),
    Internal("vllm.envs", "VLLM_API_KEY", "reads it: the key when --api-key is not given, as vLLM does"),
)
