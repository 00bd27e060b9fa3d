"""python -m token_service: the decode engine (see --help)."""

from common.protocol import ServiceKind
from common.service import main
from common.settings import TokenSettings

if __name__ == "__main__":
    main(ServiceKind.TOKEN, TokenSettings, "DéjàVu token service: continuous-batching decode of requests whose KV a prompt service streamed in.", "token_service.app:create_app")
