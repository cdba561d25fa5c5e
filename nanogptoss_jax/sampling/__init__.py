"""Generation with a KV cache: the sampler's math, the jitted decode loop, text in and out."""
