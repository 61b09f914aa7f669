"""The backend's driver: always active, on the CPU; nothing to launch (the interpreter runs every kernel)."""

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase


class CpuInterpreterDriver(DriverBase):
    @staticmethod
    def is_active() -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("kernels run in Triton's interpreter (TRITON_INTERPRET=1)")

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cpu", 0, 0)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("kernels run in Triton's interpreter (TRITON_INTERPRET=1)")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0
