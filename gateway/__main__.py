"""python -m gateway: the OpenAI-compatible front door (see --help)."""

import sys

from common.protocol import ServiceKind
from common.service import run
from common.settings import GatewaySettings, SettingsError, load


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load(GatewaySettings, sys.argv[1:] if argv is None else argv, prog="python -m gateway",
                        description="DéjàVu gateway: OpenAI /v1/completions and /v1/chat/completions over the cluster "
                                    "found in the Redis registry.")
    except SettingsError as exc:
        sys.exit(f"gateway: bad setting: {exc}")
    from gateway.app import create_app

    run(create_app(settings), settings, ServiceKind.GATEWAY)


if __name__ == "__main__":
    main()
