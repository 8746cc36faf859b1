"""Codecs and the self-describing frame format (arrives with the compression issue)."""

__all__: list[str] = []
