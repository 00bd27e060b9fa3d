"""How many KV blocks a token engine or stage holds, from its settings and its model's shape.

Apart from token_service/engine.py, and free of Prometheus metrics, so that a prompt pipeline's
stages (token_service/stage_app.py) can size theirs without registering the token engine's series
in a prompt service's /metrics.
"""

from __future__ import annotations

import torch

from common.settings import SettingsError, TokenSettings, kv_device_bytes_needed
from engine.runner import ModelRunner


def kv_room(settings: TokenSettings, runner: ModelRunner) -> tuple[int, int]:
    """(blocks of the KV pool, blocks of the device with --swap, else 0), the same on every stage of
    a pipeline: --kv-device-bytes counts blocks of the largest stage's layers (the first's).
    Raises SettingsError when one sequence of --max-model-len does not fit (with --swap: in half the
    device, the step computing and the next one)."""
    if not isinstance(settings, TokenSettings):  # a prompt pipeline's stages hold no pool
        return 0, 0
    if not settings.kv_device_bytes:
        return settings.num_blocks, 0
    kv, bs = runner.kv, runner.block_size
    block_bytes = kv.stage_block_bytes(settings.stages, bs)
    device = settings.kv_device_bytes // block_bytes
    room = (device // 2 if settings.swap else device) * bs
    if room < settings.max_model_len:  # `dejavu up` checks this before it starts anything, with the same sum
        need = kv_device_bytes_needed(settings.max_model_len, bs, block_bytes, settings.swap)
        raise SettingsError(f"--kv-device-bytes {settings.kv_device_bytes}: {device} blocks of {bs} tokens "
                            f"({block_bytes} bytes each) hold {room} tokens{' per step (half the device)' if settings.swap else ''}, "
                            f"less than one sequence of --max-model-len {settings.max_model_len}: give at least {need}")
    return (settings.num_blocks, device) if settings.swap else (device, 0)


def new_pool(runner: ModelRunner, num_blocks: int) -> torch.Tensor:
    """runner.new_pool, or a SettingsError that says how big it was and what to lower."""
    try:
        return runner.new_pool(num_blocks)
    except (RuntimeError, MemoryError) as exc:  # torch's "can't allocate memory"
        size = num_blocks * runner.block_size * runner.pool_bytes_per_token / 2 ** 30
        why = (str(exc) or type(exc).__name__).splitlines()[0]
        raise SettingsError(f"the KV pool, {num_blocks} blocks of {runner.block_size} tokens ({size:.1f} GiB), could "
                            f"not be allocated ({why}): lower --max-seqs or --max-model-len, or set --kv-blocks") from None
