"""A ~151k-token byte-level BPE, trained here, standing in for GLM-4's 151k vocabulary in the structured-
output benchmark (no hub downloads). Trained on the Python sources of the installed packages (~100 MiB
of code and docstrings), which hold enough distinct words to reach 151,000 merges.

    python benchmarks/structured_tokenizer.py [DIR]    # default ~/.cache/loom/bench-bpe-151k
"""

from __future__ import annotations

import logging
import sys
import sysconfig
from pathlib import Path

from loom.paths import cache_dir

logger = logging.getLogger(__name__)

VOCAB_SIZE = 151_000
CORPUS_BYTES = 100 * 2**20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def default_dir() -> Path:
    return cache_dir("bench-bpe-151k")


def _corpus():
    seen = 0
    for path in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        seen += len(text)
        yield text
        if seen > CORPUS_BYTES:
            return


def build(out_dir: Path | None = None) -> Path:
    """The tokenizer directory (made on first use; minutes on 2 cores)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out_dir = out_dir or default_dir()
    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    logger.info("training a %d-token BPE into %s", VOCAB_SIZE, out_dir)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    hf.save_pretrained(tmp)
    tmp.rename(out_dir)
    return out_dir


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
