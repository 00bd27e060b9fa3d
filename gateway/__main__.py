"""python -m gateway: the OpenAI-compatible front door (see --help)."""

from common.protocol import ServiceKind
from common.service import main
from common.settings import GatewaySettings

if __name__ == "__main__":
    main(ServiceKind.GATEWAY, GatewaySettings, "DéjàVu gateway: OpenAI /v1/completions and /v1/chat/completions over the services found in the Redis registry.", "gateway.app:create_app")
