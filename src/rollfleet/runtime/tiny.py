"""A tiny random Qwen2 model with a BPE tokenizer trained here: no downloads, deterministic.

`model.name: rollfleet/tiny-random-qwen2` makes every process (trainer, engines) resolve to the same
files, built once per machine into ~/.cache/rollfleet (atomic rename, so concurrent builders agree).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

TINY_MODEL = "rollfleet/tiny-random-qwen2"
VERSION = 3  # bump when the recipe changes
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen2's tokenizers carry it
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _corpus(lines: int = 4000) -> list[str]:
    rng = random.Random(0)
    words = ("the a of to in and is are was be hi hello world model token text small tiny test ray gpu "
             "value key cache batch sample answer question one two three four five six seven eight nine "
             "ten zero red green blue cat dog house tree water fire day night good bad new old yes no what "
             "who when where why how this that it we you they").split()
    out = []
    for i in range(lines):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        out.append(s.capitalize() + rng.choice(".!?,") + (f" {rng.randint(0, 9999)}" if i % 5 == 0 else ""))
    out.append("".join(chr(c) for c in range(32, 127)))
    return out


def build(out: Path, hidden: int = 256, layers: int = 2) -> None:
    """hidden 256 / 4 heads: head_dim 64, which every FlashAttention build supports."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=512, clean_up_tokenization_spaces=False)
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=(len(fast) + 63) // 64 * 64, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=eos,
                      eos_token_id=eos, pad_token_id=eos)
    Qwen2ForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    config = out / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"  # never a hub-specific slow tokenizer
    data["chat_template"] = CHAT_TEMPLATE
    config.write_text(json.dumps(data, indent=2))


def ensure(cache: Path | None = None) -> Path:
    """The tiny model's directory, building it on first use."""
    cache = cache or Path(os.environ.get("ROLLFLEET_CACHE", Path.home() / ".cache" / "rollfleet"))
    target = cache / f"tiny-random-qwen2-v{VERSION}"
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tiny-"))
    build(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name: str) -> str:
    """A model name as engines and trainers load it: the tiny model's path, or the name itself."""
    return str(ensure()) if name == TINY_MODEL else name
