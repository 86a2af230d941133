"""``attngen.distributed``: context-parallel sliding-window attention over torch.distributed
(the implementation lives in :mod:`attngen.integrations.distributed`)."""

from .integrations.distributed import attention

__all__ = ["attention"]
