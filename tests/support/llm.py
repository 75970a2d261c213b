"""A language-model user's files: a JSON-lines file of `messages` (three tasks: English to
German, English to French, a word reversed), its experiment file, and a tiny model folder with
a chat template, as `transformers` saves one.

The experiment trains `tiny-llama` (random, tiny) with the `bytes` tokenizer in a second or two;
the model folder needs transformers and tokenizers (import them, or skip, before calling
`write_chat_tokenizer` or `write_chat_model`).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "CHAT_SPECIALS",
    "CHAT_TEMPLATE",
    "MESSAGES_EXPERIMENT",
    "WORDS",
    "message_rows",
    "write_chat_model",
    "write_chat_tokenizer",
    "write_messages",
]

# English, German, French.
WORDS = [
    ("one", "eins", "un"), ("two", "zwei", "deux"), ("three", "drei", "trois"),
    ("four", "vier", "quatre"), ("five", "fünf", "cinq"), ("six", "sechs", "six"),
    ("seven", "sieben", "sept"), ("eight", "acht", "huit"),
]


def message_rows() -> list[dict]:
    """Three clients (de, fr, rev), each its own cluster, eight conversations each."""
    rows = []
    for english, german, french in WORDS:
        for client, system, answer in (("de", "Translate to German.", german),
                                       ("fr", "Translate to French.", french),
                                       ("rev", "Reverse the word.", english[::-1])):
            rows.append({"client": client, "cluster": client, "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": english},
                {"role": "assistant", "content": answer},
            ]})
    return rows


def write_messages(path: Path, rows: list | None = None) -> Path:
    """The rows as JSON lines (a string row is written as it stands: a bad line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = message_rows() if rows is None else rows
    path.write_text("".join(
        (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


# data_dir is relative to the experiment file's folder: the file lives in <root>/configs/,
# the data in <root>/data/.
MESSAGES_EXPERIMENT = """
name = "chats"
seed = 0

[task]
dataset = "jsonl"
data_dir = "../data/chats.jsonl"
num_clients = 3
num_clusters = 3
tokenizer = "bytes"
template = "plain"
max_length = 48
generate_tokens = 6
shift = "none"

[model]
name = "tiny-llama"

[method]
name = "floral"
rank = 2
train_base = false
bias = false
include = ["*.q_proj", "*.v_proj"]

[train]
rounds = 2
batch_size = 4
lr = 0.05
optimizer = "adamw"

[engine]
eval_every = 1
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_SPECIALS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def write_chat_tokenizer(folder: Path) -> Path:
    """A byte-level tokenizer (256 bytes + 4 special tokens) with a chat template."""
    import tokenizers
    import transformers

    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    model = tokenizers.models.BPE(vocab=vocab, merges=[])
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = byte_level
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens(CHAT_SPECIALS)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>",
                                                pad_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


def write_chat_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama and its chat tokenizer in one folder, as a user's model would be:
    `hf:<folder>` serves as both model.name and task.tokenizer."""
    import torch
    import transformers

    write_chat_tokenizer(folder)
    torch.manual_seed(seed)
    # Untied output head: a random tied one answers every prompt with its last token.
    config = transformers.LlamaConfig(
        vocab_size=256 + len(CHAT_SPECIALS), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return folder
