"""python -m gateway: the OpenAI-compatible front door (see --help)."""

import os
import sys

from common.protocol import ServiceKind
from common.service import main
from common.settings import GatewaySettings


def _without_torch() -> None:
    """The gateway needs transformers for its tokenizer and chat templates, never torch, which
    transformers imports whenever it is installed: 2.3 s of a 4.9 s start on this project's 2-core VM
    (the gateway was the last service of a cluster to be ready) and ~300 MB of memory. Marked as
    absent, transformers serves tokenizers alone; any torch import here would fail at once."""
    sys.modules.setdefault("torch", None)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # its "PyTorch was not found" line


if __name__ == "__main__":
    _without_torch()
    main(ServiceKind.GATEWAY, GatewaySettings, "DéjàVu gateway: OpenAI /v1/completions and /v1/chat/completions over the services found in the Redis registry.", "gateway.app:create_app")
