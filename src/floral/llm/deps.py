"""The optional dependencies of floral.llm, imported on first use."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from floral.errors import ConfigError

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ConfigError):
    """An optional package that a language-model feature needs is not installed."""


# peft imports bitsandbytes where it is installed, whose CPU backend then logs that an optional
# kernel package is missing: nothing a user of floral acts on.
_QUIET_AT_IMPORT = ("bitsandbytes.backends.cpu.ops",)


def require(module: str) -> ModuleType:
    """Import `module`, or stop in one line naming the extra that installs it."""
    for name in _QUIET_AT_IMPORT:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.partition(".")[0]
        raise MissingExtraError(
            f"{top} is not installed; language models need: pip install 'floral-lora[llm]'"
        ) from None
