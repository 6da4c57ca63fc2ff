"""Engine configuration: validated dataclasses, one source of defaults. The CLI is built from these fields."""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
import types
import typing
from dataclasses import MISSING, dataclass, fields
from functools import cache

from loom.errors import InvalidRequest

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULING_POLICIES = ("fcfs", "priority", "program")
QUANTIZATIONS = ("int8", "int4")
QUANTIZATION_GROUP_SIZES = (32, 64, 128)


@dataclass
class EngineConfig:
    """Everything the engine needs to know to load a model and serve it."""

    model: str | None = None
    """Path of an HF-format model directory; None uses the built-in tiny model (made locally on first use)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to the model directory."""
    dtype: str = "auto"
    """Weights and activations dtype: auto (the checkpoint's torch_dtype where the device supports it), float32, bfloat16, float16 (CUDA only)."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    seed: int = 0
    """Seed of the sampler for requests that bring no seed of their own."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; defaults to the model's max_position_embeddings."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    num_blocks: int | None = None
    """KV-cache blocks in the pool; overrides kv_cache_memory_bytes when given."""
    kv_cache_memory_bytes: int | None = None
    """Bytes of KV cache to preallocate; defaults to 1 GiB on CPU and to gpu_memory_utilization of free memory on CUDA."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's free memory (after loading weights) the KV cache may take."""
    max_num_seqs: int = 128
    """Most requests running in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step: prefill chunks and decode tokens together."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps to fit the token budget (otherwise a prompt must fit whole)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prefixes across requests and turns."""
    prefix_aware_window: int = 8
    """Among this many waiting requests of equal priority, admit the one with the longest cached prefix first (each is passed over at most this many times); 0 or 1 keeps strict arrival order."""
    scheduling_policy: str = "fcfs"
    """fcfs (arrival order), priority (lower SamplingParams.priority first, then arrival), or program (least attained service of the request's agent program first, so short workflows are not stuck behind long ones)."""
    program_pin_ttl_s: float = 30.0
    """How long the KV of a finished call stays pinned for the next call of the same agent program (released early at program end or when memory is short); 0 disables pinning."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None leaves torch's default (`loom serve` then uses all cores but one, which it leaves to the HTTP loop and the detokenizer)."""
    max_logprobs: int = 20
    """Most top log-probabilities a request may ask for."""
    limit_mm_per_prompt: str | dict | None = None
    """Most images one prompt may carry, as JSON: {"image": 16} by default (vLLM's flag)."""
    mm_processor_kwargs: str | dict | None = None
    """Overrides of the checkpoint's image preprocessing, as JSON, e.g. {"max_pixels": 5000000} (vLLM's flag)."""
    chat_template_content_format: str = "auto"
    """How message content reaches the chat template: openai (a list of parts; images as {"type": "image"}), string (parts flattened to text, one image placeholder per line first, as vLLM does), or auto (openai when the template walks content parts)."""
    allowed_local_media_path: str | None = None
    """Directory that file:// image URLs may read from (symlinks and `..` cannot leave it); unset refuses every file:// URL."""
    allowed_media_domains: str | None = None
    """Comma-separated host names that http(s) image URLs may be fetched from (never private, loopback or link-local addresses); unset refuses every http(s) URL."""
    encoder_cache_bytes: int = 512 * 2**20
    """Bytes of vision-encoder outputs kept for reuse (images of requests still being prefilled are always kept)."""
    speculative_config: str | dict | None = None
    """Speculative decoding without a draft model, as JSON: {"method": "ngram" (prompt lookup) or "suffix" (also the earlier requests of the agent program), "num_speculative_tokens": k, "prompt_lookup_min": a, "prompt_lookup_max": b, "adaptive": true, "disable_by_batch_size": 0}; greedy output is unchanged, sampled output keeps its distribution."""
    grammar_compile_timeout_s: float = 10.0
    """Longest a request waits for its structured-output grammar (JSON schema, regex, choice, grammar, forced tool calls) to compile before it is refused (HTTP 400); compiled grammars are cached."""
    step_timeout_s: float = 600.0
    """Seconds one engine step may run before the engine is declared hung: every request in flight fails and the server exits non-zero (so a supervisor restarts it); 0 disables the watchdog."""
    quantization: str | None = None
    """Weight-only quantization of the linear layers, done at load from the float checkpoint: int8 (one scale per output channel) or int4 (groups of quantization_group_size input channels, scale and zero point); None keeps float weights. A GPTQ or AWQ int4 checkpoint loads its own 4-bit values as int4 at its own group size (None or int4 here). CPU only; activations stay in dtype."""
    quantization_group_size: int = 128
    """Input channels sharing one int4 scale and zero point: 32, 64 or 128 (smaller is more accurate and a little larger)."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{name} {why}", param=name)

        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise bad("device", f"must be one of {DEVICES}, got {self.device!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise bad(
                "scheduling_policy", f"must be one of {SCHEDULING_POLICIES}, got {self.scheduling_policy!r}"
            )
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.encoder_cache_bytes < 0:
            raise bad("encoder_cache_bytes", f"must be >= 0, got {self.encoder_cache_bytes}")
        for name in ("num_blocks", "kv_cache_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(name, f"must be >= 1, got {value}")
        from loom.engine.spec_decode.config import SpeculativeConfig

        self.speculative = SpeculativeConfig.parse(self.speculative_config)
        from loom.frontend.multimodal import CONTENT_FORMATS, image_limit, parse_json_option

        self.image_limit = image_limit(self.limit_mm_per_prompt)
        self.processor_overrides = parse_json_option(self.mm_processor_kwargs, "mm_processor_kwargs")
        if self.chat_template_content_format not in CONTENT_FORMATS:
            raise bad(
                "chat_template_content_format",
                f"must be one of {CONTENT_FORMATS}, got {self.chat_template_content_format!r}",
            )
        if not self.grammar_compile_timeout_s > 0:
            raise bad("grammar_compile_timeout_s", f"must be > 0, got {self.grammar_compile_timeout_s}")
        if self.step_timeout_s < 0:
            raise bad("step_timeout_s", f"must be >= 0, got {self.step_timeout_s}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise bad("quantization", f"must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        if self.quantization_group_size not in QUANTIZATION_GROUP_SIZES:
            raise bad(
                "quantization_group_size",
                f"must be one of {QUANTIZATION_GROUP_SIZES}, got {self.quantization_group_size}",
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")

    def media_config(self):
        """Where images may come from (loom.multimodal.media.MediaConfig)."""
        from loom.multimodal.media import MediaConfig

        domains = tuple(d.strip() for d in (self.allowed_media_domains or "").split(",") if d.strip())
        return MediaConfig(
            allowed_local_media_path=self.allowed_local_media_path, allowed_media_domains=domains
        )


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source (so help text lives in one place)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def config_fields(cls: type) -> list[tuple[str, type, object, str]]:
    """(name, annotation, default, help) of each field, for building a CLI."""
    docs = field_docs(cls)
    return [(f.name, f.type, f.default, docs.get(f.name, "")) for f in fields(cls)]


def add_config_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One --flag per field of a config dataclass (booleans get --flag / --no-flag), help from its docstring."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title)
    for name, _, default, help_text in config_fields(cls):
        kind = hints[name]
        if isinstance(kind, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        flag = "--" + name.replace("_", "-")
        default = None if default is MISSING else default
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            group.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})")


def config_from_args(args: argparse.Namespace, cls: type):
    """Build a config dataclass from the flags add_config_args made."""
    return cls(**{name: getattr(args, name) for name, *_ in config_fields(cls)})
