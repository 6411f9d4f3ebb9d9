"""gemx: turn a multi-reference talking-head super-resolution model into fast deployable inference."""

from gemx.errors import GemxError

__version__ = "0.1.0"
__all__ = ["GemxError", "__version__"]
