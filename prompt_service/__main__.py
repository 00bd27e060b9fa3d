"""python -m prompt_service: the prefill engine (see --help)."""

from common.protocol import ServiceKind
from common.service import main
from common.settings import PromptSettings

if __name__ == "__main__":
    main(ServiceKind.PROMPT, PromptSettings, "DéjàVu prompt service: batched prefill that streams each layer's KV to a token service as soon as it is computed.", "prompt_service.app:create_app")
