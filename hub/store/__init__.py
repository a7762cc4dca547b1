"""User stores: one contract (`Store`), two implementations (in-memory and Redis)."""

from hub.store.base import BulkResult, Store
from hub.store.memory import MemoryStore

__all__ = ["BulkResult", "MemoryStore", "Store"]
