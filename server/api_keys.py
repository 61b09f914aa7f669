"""The API key on every route but the probes (and, by default, /metrics).

vLLM's own check covers ``/v1`` and a few other prefixes only, which leaves ``/tokenize``,
``/detokenize``, ``/load``, the docs and the OpenAPI document open to anyone: ours, in the
middleware that sees every request first, covers them all. ``/health`` and ``/ping`` stay open
for orchestrators' probes, ``/metrics`` for Prometheus unless ``--metrics-require-api-key``.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.types import Scope

PROBE_PATHS = ("/health", "/ping")
METRICS_PATH = "/metrics"
MESSAGE = "Incorrect or missing API key: send `Authorization: Bearer <key>`."


class ApiKeyGuard:
    """Which requests must carry one of the server's keys, and whether this one does.

    The keys are vLLM's (``--api-key``, else ``VLLM_API_KEY``), compared by vLLM's own constant-time
    check; only the set of routes is ours.
    """

    def __init__(self, keys: list[str], metrics_open: bool):
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        self.checker = AuthenticationMiddleware(app=None, tokens=keys)
        self.open_paths = PROBE_PATHS + ((METRICS_PATH,) if metrics_open else ())

    @classmethod
    def from_args(cls, args: Any) -> ApiKeyGuard | None:
        """The guard the parsed flags ask for; None when the server has no key."""
        from vllm import envs

        keys = [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]
        return cls(keys, not args.metrics_require_api_key) if keys else None

    def allows(self, scope: Scope, path: str) -> bool:
        """Whether the request to ``path`` (inside the app) may go on."""
        headers = Headers(scope=scope)
        if scope["method"] == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers:
            # A CORS preflight carries no credentials; vLLM's CORS middleware answers it with headers alone,
            # never reaching a route. Any other OPTIONS request is a request like the rest.
            return True
        if path in self.open_paths or METRICS_PATH in self.open_paths and path.startswith(METRICS_PATH + "/"):
            return True
        return self.checker.verify_token(headers)
