"""python -m token_service: the decode engine (see --help)."""

import sys

from common.protocol import ServiceKind
from common.service import run
from common.settings import SettingsError, TokenSettings, load


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load(TokenSettings, sys.argv[1:] if argv is None else argv, prog="python -m token_service",
                        description="DéjàVu token service: continuous-batching decode; receives KV from prompt services.")
    except SettingsError as exc:
        sys.exit(f"token_service: bad setting: {exc}")
    from token_service.app import create_app

    run(create_app(settings), settings, ServiceKind.TOKEN)


if __name__ == "__main__":
    main()
