"""Engine adapters built on the public kvstore API (arrive with the engine-hooks issue)."""

__all__: list[str] = []
