"""Engine adapters built on the public kvstore API (arrive with the engine-hooks issue)."""

from kvstore.integrations.paged import (HFContiguousAdapter, Location, PagedAdapter, SGLangPoolAdapter, TokenSlots,
                                        TokenSpan, VLLMPagedAdapter, check_page_size, slot_mapping)

__all__: list[str] = ["HFContiguousAdapter", "Location", "PagedAdapter", "SGLangPoolAdapter", "TokenSlots",
                      "TokenSpan", "VLLMPagedAdapter", "check_page_size", "slot_mapping"]
