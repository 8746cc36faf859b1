"""Engine adapters built on the public kvstore API.

``paged`` copies between the store's blocks and engines' paged KV buffers
(vLLM pages, SGLang token pools, contiguous caches); ``transformers``
serves a Hugging Face model's prompts from a store (imported on its own:
it needs the ``transformers`` package); ``demo`` is ``kvstore demo``.
"""

from kvstore.integrations.paged import (HFContiguousAdapter, Location, PagedAdapter, SGLangPoolAdapter, TokenSlots,
                                        TokenSpan, VLLMPagedAdapter, check_page_size, slot_mapping)

__all__: list[str] = ["HFContiguousAdapter", "Location", "PagedAdapter", "SGLangPoolAdapter", "TokenSlots",
                      "TokenSpan", "VLLMPagedAdapter", "check_page_size", "slot_mapping"]
