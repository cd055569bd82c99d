"""HF config fields of real models' shapes, for tests of plans and pools that need no weights.

Owns plain dicts only; imports nothing.
"""

SMOLLM2_HF = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
              "intermediate_size": 1536, "num_hidden_layers": 30}   # SmolLM2-135M

LLAMA_1B_HF = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
               "intermediate_size": 8192, "num_hidden_layers": 16}  # Llama-3.2-1B
