"""Memory layers: product-key memory and hashed n-gram memory (Engram).

``product_key_topk`` (exact top-k over n * n product-key slots),
``ProductKeyMemory`` (FFN kind 'pkm'), ``NGramMemory`` (FFN kind 'engram')
with its id-only lookup ``ngram_indices`` / ``ngram_lookup`` (the serving
engine can fetch rows before the layer runs).
"""

from moejax.memory import kinds  # registers the FFN kinds 'pkm', 'engram', 'pkm+moe', ...
from moejax.memory.ngram import NGramMemory, hash_multipliers, ngram_indices, ngram_lookup, table_layout
from moejax.memory.product_key import (VALUES, MemoryValues, ProductKeyMemory, product_key_topk,
                                       topk_from_halves)

__all__ = ["VALUES", "kinds", "MemoryValues", "NGramMemory", "ProductKeyMemory", "hash_multipliers",
           "ngram_indices", "ngram_lookup", "product_key_topk", "table_layout", "topk_from_halves"]
