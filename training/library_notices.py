"""Quiet the import-time notices torchao brings into every run once it is installed (``[fp8]``).

They concern parts of torchao that lora-sweeper does not use: its compiled C++ kernels (built for
CUDA torch; a CPU torch cannot load them), torch's deprecation of how torchao registers two enums,
and diffusers' loading of torchao-quantized checkpoints. Float8 training (``precision.fp8_matmul``)
is torchao's Python layer over ``torch._scaled_mm`` and needs none of them. Five such lines before
every run would bury the ones that matter; errors still show.
"""

from __future__ import annotations

import logging


class _DropTorchaoEnumNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "register_constant()" not in record.getMessage()


def quiet_torchao_import_notices() -> None:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").setLevel(logging.ERROR)
    pytree = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _DropTorchaoEnumNotice) for f in pytree.filters):
        pytree.addFilter(_DropTorchaoEnumNotice())
