"""python -m prompt_service: the prefill engine (see --help)."""

import sys

from common.protocol import ServiceKind
from common.service import run
from common.settings import SettingsError, PromptSettings, load


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load(PromptSettings, sys.argv[1:] if argv is None else argv, prog="python -m prompt_service",
                        description="DéjàVu token service: batched prefill; streams each layer's KV to a token service as it is computed.")
    except SettingsError as exc:
        sys.exit(f"prompt_service: bad setting: {exc}")
    from prompt_service.app import create_app

    run(create_app(settings), settings, ServiceKind.PROMPT)


if __name__ == "__main__":
    main()
