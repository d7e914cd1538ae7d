"""The shapes of real models the benchmarks build with random weights (LlamaConfig fields), kept
in one place: Llama-3.2-1B and -3B (configs/trace.yaml's model) and the bundled SmolLM2-135M."""

# What Llama 3.2's config.json sets beside the widths (LLAMA_3B's; tools/bench_ranks.py builds LLAMA_1B's
# widths at 1024 positions, below this scaling's 8192): RMSNorm's epsilon, and rope theta 500000 with
# the "llama3" frequency scaling over 131072 positions (the legacy field names, which transformers 4.56
# and 5 both read).
LLAMA32 = dict(
    rms_norm_eps=1e-5,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=True,
)
LLAMA_3B = dict(
    vocab_size=128256,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    tie_word_embeddings=True,
    **LLAMA32,
)
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,  # these three as its GGUF file's metadata gives them
    max_position_embeddings=8192,
    rope_theta=100000.0,
)
