"""python -m cache_store: the KV replica store (see --help)."""

from common.protocol import ServiceKind
from common.service import main
from common.settings import CacheStoreSettings

if __name__ == "__main__":
    main(ServiceKind.CACHE_STORE, CacheStoreSettings, "DéjàVu cache store: holds the KV replicas token services send, for recovery.", "cache_store.app:create_app")
