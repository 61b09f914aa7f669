"""The backend's compiler: it compiles nothing (TRITON_INTERPRET=1 runs kernels in the interpreter)."""

from triton.backends.compiler import BaseBackend


class CpuInterpreterBackend(BaseBackend):
    @staticmethod
    def supports_target(target) -> bool:
        return target.backend == "cpu"

    def hash(self) -> str:
        return "cpu-interpreter"

    def parse_options(self, options: dict):
        raise NotImplementedError("kernels run in Triton's interpreter (TRITON_INTERPRET=1)")

    def add_stages(self, stages: dict, options, language) -> None:
        raise NotImplementedError("kernels run in Triton's interpreter (TRITON_INTERPRET=1)")

    def load_dialects(self, context) -> None:
        pass

    def get_module_map(self) -> dict:
        return {}
