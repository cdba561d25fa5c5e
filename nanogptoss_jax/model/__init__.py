"""The models, in plain JAX that reads like the math: configs, layers, RoPE, attention with
sinks, the mixture of experts, the unembedding, GPT-OSS, GPT-2 and the registry of kinds."""
