"""Data loading for SFT: formats, mixtures, held-out split, length policy, synthetic tasks.

Every split comes out in TRL's prompt-completion format plus fixed metadata columns (schema.py): conversational
(message lists) by default, standard (plain text) for a tokenizer without a chat template (standard.py).
"""

from taso_llm.data.args import DataArguments
from taso_llm.data.errors import DataFormatError
from taso_llm.data.length import apply_length_policy
from taso_llm.data.loading import load_sft_splits
from taso_llm.data.schema import COLUMNS, FEATURES

__all__ = ["COLUMNS", "FEATURES", "DataArguments", "DataFormatError", "apply_length_policy", "load_sft_splits"]
