"""Hold back one bitsandbytes notice that every Trainer import would otherwise print.

On CPUs with AVX512-BF16, importing bitsandbytes (transformers and peft import it on every Trainer run) tries to
fetch an optional 4-bit CPU kernel from the Hub through the ``kernels`` package and logs "Failed to load CPU
gemm_4bit_forward from kernels-community ..." when it cannot. Declaring ``kernels`` would not help: it would
download at every import, and offline it logs the same line. Runs that do not quantize never use that kernel,
so the notice is held here (only that message, only that logger); the 4-bit loading path re-logs it
(:data:`HELD`) where it matters.
"""

from __future__ import annotations

import logging

__all__ = ["HELD", "NOTICE"]

NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
HELD: list[logging.LogRecord] = []


class _HoldKernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(NOTICE):
            HELD.append(record)
            return False
        return True


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HoldKernelsNotice())
