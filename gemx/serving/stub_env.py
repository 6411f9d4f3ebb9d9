"""What the environment Triton's Python backend stub runs gemx in must have: read by the launcher before it starts a
server, and by the model inside the stub, which must not import the launcher."""

from __future__ import annotations

import sys

from gemx.errors import GemxError

SERVE_EXTRA = "pip install 'gemx[serve]'"


def check_stub_numpy() -> None:
    """The stub's tensors arrive corrupted with numpy 2.x (seen with the wheel's 2.51 stub); 1.26 is correct."""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise GemxError(f"the Triton Python backend stub needs numpy < 2 in the serving environment ({sys.prefix} has "
                        f"numpy {numpy.__version__}); install the serving extra there: {SERVE_EXTRA}")
