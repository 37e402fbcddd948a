"""MemoryConfig fails at construction, naming the field."""

import pytest

from moejax.config import ConfigError, MemoryConfig


@pytest.mark.parametrize("changes, field", [
    (dict(num_slots=1000), "num_slots"),             # not a square
    (dict(num_slots=0), "num_slots"),
    (dict(num_slots=256, top_k=17), "top_k"),        # k > n = 16
    (dict(d_key=7), "d_key"),                        # two halves
    (dict(d_value=0), "d_value"),
    (dict(num_heads=0), "num_heads"),
    (dict(ngram_orders=()), "ngram_orders"),
    (dict(ngram_orders=(3, 2)), "ngram_orders"),
    (dict(ngram_orders=(0, 2)), "ngram_orders"),
    (dict(ngram_table_rows=100), "ngram_table_rows"),  # 12 rows per head < the 8th prime (19)
    (dict(ngram_id_map="lower"), "ngram_id_map"),
    (dict(ngram_conv_kernel=0), "ngram_conv_kernel"),
    (dict(ngram_table_rows=2**32), "ngram_table_rows"),  # int32 rows would wrap to row 0
    (dict(num_slots=2**32, top_k=4), "num_slots"),
    (dict(hash_seed=-1), "hash_seed"),
    (dict(hash_seed=2**32), "hash_seed"),            # folded into a key as uint32
    (dict(hash_seed=True), "hash_seed"),
])
def test_bad_memory_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"MemoryConfig\.{field}\b"):
        MemoryConfig(**changes)


def test_table_sizes_are_distinct_primes_within_each_heads_share():
    cfg = MemoryConfig(ngram_orders=(2, 3), ngram_heads=4, ngram_table_rows=152)
    sizes = [s for order in cfg.ngram_table_sizes() for s in order]
    assert len(set(sizes)) == 8 and max(sizes) <= 152 // 8
    assert all(all(s % d for d in range(2, s)) for s in sizes)
    assert MemoryConfig(num_slots=256, top_k=16).num_keys == 16
