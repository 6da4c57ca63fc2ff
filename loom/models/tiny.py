"""Built-in tiny random-weight checkpoints in HF format, made locally so tests and demos need no download.

A model directory holds config.json, generation_config.json, safetensors weights and a byte-level BPE
tokenizer with a ChatML chat template. Everything is deterministic for a given seed, and directories are
published atomically (built in a temp dir beside the target, then renamed) so concurrent makers never
expose half a model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from loom.paths import cache_dir

logger = logging.getLogger(__name__)
_RNG_LOCK = threading.Lock()

ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "glm4v": "Glm4vForConditionalGeneration",
}
SIZES = ("tiny", "small")

# Bump when anything that changes the bytes written changes, so cached default models are rebuilt.
TINY_FORMAT_VERSION = "1"
_VERSION_FILE = ".loom-tiny-version"

# Random weights at HF's usual 0.02 make greedy decoding degenerate: the tiny llama repeats one token for
# 32 steps. Measured over 12 prompts x 32 greedy steps per tiny arch (distinct tokens per 32; top-1/top-2
# logit gap): 0.05 gives 2-19 distinct; 0.1 gives 19-32, 6/1536 gaps < 1e-3; 0.15 gives 25-32, median gap
# 0.31-0.37, 3/1536 gaps < 1e-3 (the fewest near-ties, which make float32 parity tests flaky); 0.2 is no
# better on ties and pushes activations (and bf16 error) up for nothing.
INITIALIZER_RANGE = 0.15

VOCAB_SIZE = 2048
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]

# ChatML with hermes-style tools (as in Qwen2.5). Content may be a string or a list of text parts.
CHAT_TEMPLATE = """\
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is iterable -%}
{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools -%}
{{- '<|im_start|>system\\n' -}}
{%- if messages and messages[0].role == 'system' -%}{{- text(messages[0].content) + '\\n\\n' -}}{%- endif -%}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' -}}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments ' -}}
{{- 'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' -}}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- elif messages and messages[0].role == 'system' -%}
{{- '<|im_start|>system\\n' + text(messages[0].content) + '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' and loop.first -%}
{%- elif message.role in ['user', 'system'] or (message.role == 'assistant' and not message.tool_calls) -%}
{{- '<|im_start|>' + message.role + '\\n' + text(message.content) + '<|im_end|>\\n' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant' -}}
{%- if message.content -%}{{- '\\n' + text(message.content) -}}{%- endif -%}
{%- for call in message.tool_calls -%}
{%- if call.function is defined -%}{%- set call = call.function -%}{%- endif -%}
{{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' -}}
{%- if call.arguments is string -%}{{- call.arguments -}}{%- else -%}{{- call.arguments | tojson -}}{%- endif -%}
{{- '}\\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\\n<tool_response>\\n' + text(message.content) + '\\n</tool_response>' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
{%- else -%}
{{- raise_exception('Unsupported message role: ' + message.role) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""


_PROSE = """\
The river ran low that summer, and the people of the valley walked its dry bed to count the stones. \
Nobody remembered who had started the custom, but every child learned that a stone counted twice was \
a promise kept, and a stone missed was a question for next year. In the evenings they sat by the mill \
and argued about numbers, weather, and whether the old bridge would hold another winter.
A good engineer reads the error message before changing the code. She writes a small test that fails, \
then makes it pass, then asks what else could break. When the system is slow, she measures first and \
guesses later, because the slowest part is rarely the one everyone suspects. Simple designs survive; \
clever ones need a manual, and the manual is always out of date.
Scientists study how light travels through water, how cells divide, and why some materials conduct \
heat better than others. Their results are shared in papers, discussed at conferences, and tested again \
by other groups around the world. Progress is slow and careful: most experiments fail, yet each failure \
narrows the space of possible answers and points toward the next question worth asking.
Hello! How can I help you today? Sure, here is a short answer. Thank you for the question; please let \
me know if you would like more details, an example, or a summary of the main points.
"""
_UNICODE = (
    "café naïve résumé Grüße façade Ελληνικά Привет мир 你好世界 日本語 한국어 🚀 🙂 ✨ — “quotes” ½ °C €5"
)
_CODE = [
    "def {f}({a}, {b}):",
    "    return {a} + {b} * {n}",
    "for {a} in range({n}):",
    "    if {a} % {m} == 0:",
    '        print(f"{{{a}}} is divisible by {m}")',
    "class {F}:",
    "    def __init__(self, {a}: int = {n}) -> None:",
    "        self.{a} = {a}",
    "import {mod}",
    "from {mod} import {f}",
    "{a} = [{n}, {m}, {n}]  # {w}",
    "while {a} < {n}:",
    "    {a} += {m}",
    'raise ValueError("{w} must be positive")',
    "assert {f}({n}, {m}) == {n}",
]
_NAMES = ["x", "y", "i", "count", "total", "items", "value", "result", "data", "index", "name", "size"]
_FUNCS = ["get_weather", "compute", "parse_args", "load_model", "main", "search", "add", "encode"]
_MODS = ["os", "sys", "json", "math", "torch", "random", "pathlib", "typing"]
_KEYS = ["name", "arguments", "city", "unit", "query", "id", "temperature", "results", "ok", "items"]


def corpus_lines(seed: int = 0, n: int = 4000) -> list[str]:
    """The tokenizer's training corpus: prose, code, JSON, numbers and some non-ASCII, made from `seed`."""
    rng = random.Random(seed)
    paragraphs = _PROSE.splitlines()
    words = " ".join(paragraphs).split() + _UNICODE.split()
    lines = list(paragraphs) + [_UNICODE]
    for _ in range(n):
        kind = rng.random()
        if kind < 0.4:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 18))))
        elif kind < 0.65:
            a, b = rng.sample(_NAMES, 2)
            f = rng.choice(_FUNCS)
            lines.append(
                rng.choice(_CODE).format(
                    a=a,
                    b=b,
                    f=f,
                    F=f.title().replace("_", ""),
                    n=rng.randint(0, 999),
                    m=rng.randint(2, 9),
                    mod=rng.choice(_MODS),
                    w=rng.choice(words),
                )
            )
        elif kind < 0.85:
            obj = {
                rng.choice(_KEYS): rng.choice([rng.randint(-99, 9999), rng.choice(words), rng.random() > 0.5])
                for _ in range(rng.randint(1, 4))
            }
            lines.append(
                json.dumps({"name": rng.choice(_FUNCS), "arguments": obj}, ensure_ascii=rng.random() < 0.3)
            )
        else:
            lines.append(
                f"{rng.randint(0, 10**6)} {rng.uniform(-100, 100):.3f} {rng.randint(1, 12):02d}/2024"
            )
    return lines


def byte_level_bpe(lines: Iterable[str], vocab_size: int, special_tokens: list[str] | tuple = ()):
    """A byte-level BPE (`tokenizers`) trained on `lines`: special_tokens first in the vocabulary, then
    the 256 byte symbols and merges up to vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def build_tokenizer(
    lines: Iterable[str] | None = None, vocab_size: int = VOCAB_SIZE, model_max_length: int = 4096
):
    """Train a byte-level BPE of vocab_size tokens (specials and tool tokens included) on `lines` (the
    tiny models' generated corpus by default) and wrap it as a PreTrainedTokenizerFast with the ChatML
    template.

    Byte-level pre-tokenization makes every unicode string encode losslessly whatever the corpus held.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(
        corpus_lines() if lines is None else lines, vocab_size - len(TOOL_TOKENS), SPECIAL_TOKENS
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token=EOS_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
    )


def _sizes(size: str) -> dict:
    if size == "tiny":
        return dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=384,
        )
    # ~89M parameters. The MLP is wider than 2048 because 12 GQA layers (4 KV heads) at 768/2048 come to
    # only ~79M; 2432 (a multiple of 128) keeps GQA and lands inside the 85-92M target.
    return dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=2432,
    )


def _model_config(arch: str, size: str, eos_ids: list[int], pad_id: int):
    from transformers import Glm4Config, GlmConfig, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "glm": GlmConfig, "glm4": Glm4Config}[arch]
    kwargs = dict(
        _sizes(size),
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=INITIALIZER_RANGE,
        # Tied embeddings only on tiny llama, so one tiny model exercises weight tying.
        tie_word_embeddings=(arch == "llama" and size == "tiny"),
        bos_token_id=None,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        architectures=[ARCHS[arch]],
        dtype="float32",
    )
    if arch in ("glm", "glm4"):
        kwargs.update(partial_rotary_factor=0.5, attention_bias=True)
    return cls(**kwargs)


def _randomize_extras(model: torch.nn.Module, std: float) -> None:
    """Give biases and norm weights random values, which HF initializes to 0 and 1.

    With constant values a loader that drops a bias or swaps two norms would still match HF exactly.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, std)
            elif "norm" in name and name.endswith(".weight"):
                param.uniform_(0.8, 1.2)


def _update_json(path: Path, updates: dict, drop: tuple[str, ...] = ()) -> None:
    raw = json.loads(path.read_text())
    raw.update(updates)
    for key in drop:
        raw.pop(key, None)
    path.write_text(json.dumps(raw, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished tmp dir to out_dir. When another process won the race, keep theirs."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()  # an empty dir (e.g. from mkdtemp/tmp_path) is not a model: take its place
    try:
        os.rename(tmp, out_dir)
        return
    except OSError:
        if not out_dir.exists():
            raise
    if not overwrite:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if not (out_dir / _VERSION_FILE).is_file():
        raise FileExistsError(f"{out_dir} exists and is not a loom tiny model; not replacing it")
    # Swap: each rename is atomic, so readers see the old model or the new one, never a mix.
    trash = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
    os.replace(out_dir, trash / "m")
    os.rename(tmp, out_dir)
    shutil.rmtree(trash, ignore_errors=True)


def _build(out_dir: Path, arch: str, size: str, seed: int, max_shard_size: str | None) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch == "glm4v":
        from loom.models import glm4v_tiny

        # Same RNG discipline as below: the caller's state is left alone, one builder at a time.
        with _RNG_LOCK:
            glm4v_tiny.build(out_dir, seed, INITIALIZER_RANGE, max_shard_size)
        (out_dir / _VERSION_FILE).write_text(TINY_FORMAT_VERSION + "\n")
        return
    tokenizer = build_tokenizer()
    # The template goes inside tokenizer_config.json (not chat_template.jinja) and the class gets its
    # 4.x name, so transformers 4.x loads the same directory.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    _update_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "additional_special_tokens": SPECIAL_TOKENS[1:],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
        },
        drop=("extra_special_tokens",),  # a list here is 5.x-only; 4.x expects a dict and fails to load
    )
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", EOS_TOKEN)]
    pad_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if len(tokenizer) != VOCAB_SIZE:  # the corpus ran out of merges: it needs more varied text
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")

    config = _model_config(arch, size, eos_ids, pad_id)
    # HF initializes from torch's global RNG. Fork it so the caller's RNG state is left as it was, and
    # hold a lock so two threads building at once cannot interleave their draws.
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize_extras(model, INITIALIZER_RANGE)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **save_kwargs)
    GenerationConfig(bos_token_id=None, eos_token_id=eos_ids, pad_token_id=pad_id).save_pretrained(out_dir)

    # Older readers (transformers 4.x, most engines) look for these at the top level of config.json.
    extra = {"torch_dtype": "float32", "rope_theta": 10000.0}
    if arch in ("glm", "glm4"):
        extra["partial_rotary_factor"] = 0.5
    _update_json(out_dir / "config.json", extra)
    (out_dir / _VERSION_FILE).write_text(TINY_FORMAT_VERSION + "\n")


def _make(
    out_dir: Path, arch: str, size: str, seed: int, max_shard_size: str | None, overwrite: bool
) -> Path:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if size not in SIZES or (arch == "glm4v" and size != "tiny"):
        raise ValueError(f"size must be one of {SIZES} (glm4v: tiny only), got {size!r}")
    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        logger.info("making %s-%s random-weight model in %s", arch, size, out_dir)
        _build(tmp, arch, size, seed, max_shard_size)
        # mkdtemp makes the dir 0700 and some writers make 0600 files; a shared cache should be readable.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        _publish(tmp, out_dir, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def make_tiny(
    out_dir: str | Path,
    arch: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write a complete random-weight HF model directory (weights, configs, tokenizer) to out_dir.

    arch is one of llama, qwen2, glm, glm4, glm4v (vision-language); size is "tiny" (~1M params, for tests)
    or "small" (~89M, for benchmarks; not for glm4v). The same seed gives the same bytes. An existing tiny model at out_dir is replaced
    atomically; any other non-empty out_dir raises FileExistsError.
    Returns the absolute directory path.
    """
    return _make(Path(out_dir), arch, size, seed, max_shard_size, overwrite=True)


def default_model_dir(arch: str = "llama", size: str = "tiny") -> Path:
    """The cached built-in model `<cache>/loom/tiny-{arch}-{size}`, made on first use.

    `<cache>` is $XDG_CACHE_HOME or ~/.cache. Safe when several processes race to make it: each builds
    privately and the first rename wins.
    """
    out_dir = cache_dir(f"tiny-{arch}-{size}")
    marker = out_dir / _VERSION_FILE
    if marker.is_file() and marker.read_text().strip() == TINY_FORMAT_VERSION:
        return out_dir
    # Missing, or made by an older loom: (re)build. A stale dir is swapped out, a fresh one kept.
    return _make(out_dir, arch, size, seed=0, max_shard_size=None, overwrite=out_dir.exists())
