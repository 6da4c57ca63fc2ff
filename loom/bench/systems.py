"""The systems `loom bench throughput` times: loom, and its baselines on the same weights.

Each system is a context manager `system(model_dir, dtype, setup)` that loads the model and yields
`run(requests) -> (outputs, steps, note)`, so the timing loop is the same for all of them and none can
time something the others don't. Every request decodes greedily for exactly its `output_len` tokens (EOS
ignored), so all systems produce the same number of useful tokens.

- loom: `LLM.generate` on the whole workload (continuous batching, chunked prefill).
- hf-seq: HF transformers `generate`, one request at a time.
- hf-static: HF `generate` on static batches of 16, left-padded; each batch runs to its longest output.
- hf-cb: HF continuous batching (the manager behind `generate_batch`), per-request lengths.
- llama.cpp: llama-cpp-python on a GGUF conversion of the same checkpoint, its KV cache in the same dtype,
  one request at a time (its `Llama` class runs one sequence); optional, see loom/bench/gguf.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

HF_STATIC_BATCH = 16
HF_PAD_ID = 0
# loom's EngineConfig defaults, given to HF continuous batching too.
LOOM_TOKEN_BUDGET = 2048
LOOM_MAX_SEQS = 128
GGML_KV_TYPES = {"float32": 0, "float16": 1, "bfloat16": 30}  # ggml_type values: GGML_TYPE_F32, _F16, _BF16


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Setup:
    """What every system is given besides the model and dtype."""

    threads: int
    kv_tokens: int
    """KV capacity in tokens: enough for the whole workload at once, so no system is limited by it."""
    gguf: Path | None = None
    """llama.cpp: the GGUF file of this checkpoint in this dtype (None: llama.cpp cannot run)."""
    extra: dict = field(default_factory=dict)


Run = Callable[[list[Request]], tuple[list[list[int]], int | None, str]]
"""Run every request; returns each one's output token ids, the forward passes (None: not counted) and a
note for the table."""


@contextmanager
def loom_system(model_dir: Path, dtype: str, setup: Setup) -> Iterator[Run]:
    from loom import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=dtype, num_threads=setup.threads, num_blocks=setup.kv_tokens // 16)

    def run(reqs: list[Request]) -> tuple[list[list[int]], int, str]:
        # Timed rounds repeat the same prompts: the previous round's blocks must not be hits. Prefixes
        # shared within one round (the shared-prefix workload) are, as in any real serving run.
        llm.reset_prefix_cache()
        params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs]
        steps0 = llm.engine.stats.num_steps
        computed0 = llm.engine.stats.num_prompt_tokens_computed
        outs = llm.generate([r.prompt for r in reqs], params, use_tqdm=False)
        computed = llm.engine.stats.num_prompt_tokens_computed - computed0
        prompt = sum(len(r.prompt) for r in reqs)
        note = f"{100 * (1 - computed / prompt):.0f}% of prompt tokens cached" if computed < prompt else ""
        return [list(o.outputs[0].token_ids) for o in outs], llm.engine.stats.num_steps - steps0, note

    yield run


def load_hf(model_dir: Path, dtype: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    # generate() fills an unset eos_token_id from the checkpoint's generation_config: without this, HF
    # stops (batch of 1) or pads (batches) at the first EOS, where loom ignores it.
    model.generation_config.eos_token_id = None
    return model


def _hf_generate(model, batch: list[Request]) -> tuple[list[list[int]], int]:
    """One HF `generate` call on a left-padded batch; returns each request's own output and the steps."""
    from transformers import GenerationConfig

    width = max(len(r.prompt) for r in batch)
    max_new = max(r.output_len for r in batch)
    ids = torch.full((len(batch), width), HF_PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):  # left padding: every prompt ends at the same column
        ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[i, width - len(r.prompt) :] = 1
    # eos_token_id=None: generate exactly max_new tokens (the same effect as loom's ignore_eos).
    config = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=HF_PAD_ID
    )
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    # Useful tokens only: each request's own output length; the rest of the batch's run is waste.
    return [out[i, width : width + r.output_len].tolist() for i, r in enumerate(batch)], max_new


def _hf_batched_system(batch_size: int, model_dir: Path, dtype: str) -> Iterator[Run]:
    model = load_hf(model_dir, dtype)

    def run(reqs: list[Request]) -> tuple[list[list[int]], int, str]:
        outputs, steps = [], 0
        with torch.inference_mode():
            for b in range(0, len(reqs), batch_size):
                outs, n = _hf_generate(model, reqs[b : b + batch_size])
                outputs.extend(outs)
                steps += n
        return outputs, steps, "one at a time" if batch_size == 1 else f"batches of {batch_size}"

    yield run


@contextmanager
def hf_seq_system(model_dir: Path, dtype: str, setup: Setup) -> Iterator[Run]:
    yield from _hf_batched_system(1, model_dir, dtype)


@contextmanager
def hf_static_system(model_dir: Path, dtype: str, setup: Setup) -> Iterator[Run]:
    yield from _hf_batched_system(HF_STATIC_BATCH, model_dir, dtype)


@contextmanager
def hf_cb_system(model_dir: Path, dtype: str, setup: Setup) -> Iterator[Run]:
    """HF continuous batching, through the manager that `generate_batch` wraps.

    `generate_batch` takes one max_new_tokens for every request; the manager's add_request takes one
    per request, so each request stops at its own length as in the other systems. Its KV capacity and
    token budget are set to loom's, since on CPU it would otherwise size its cache to 60% of RAM."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = load_hf(model_dir, dtype)
    page_size = 256
    cb_config = ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=max(1, -(-setup.kv_tokens // page_size)),
        max_batch_tokens=LOOM_TOKEN_BUDGET,
        max_requests_per_batch=LOOM_MAX_SEQS,
        allow_block_sharing=False,  # its prefix sharing stays off: it would carry over between rounds
    )
    # eos_token_id=-1: no token stops a request, as with loom's ignore_eos.
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=HF_PAD_ID)
    next_id = itertools.count()

    with (
        torch.inference_mode(),
        model.continuous_batching_context_manager(
            generation_config=gen_config, continuous_batching_config=cb_config
        ) as manager,
    ):
        attn = model.config._attn_implementation

        def run(reqs: list[Request]) -> tuple[list[list[int]], None, str]:
            ids = [
                manager.add_request(
                    r.prompt, request_id=f"r{next(next_id)}", max_new_tokens=r.output_len, eos_token_id=-1
                )
                for r in reqs
            ]
            results: dict[str, list[int]] = {}
            while len(results) < len(ids):
                res = manager.get_result(timeout=1)
                if res is None:
                    if not manager.is_running():
                        raise RuntimeError("the generation thread stopped")
                    continue
                if res.is_finished():
                    if res.error is not None:
                        raise RuntimeError(res.error)
                    results[res.request_id] = list(res.generated_tokens)
            return [results[i] for i in ids], None, f"attn {attn}, page {page_size}"

        yield run


@contextmanager
def llama_cpp_system(model_dir: Path, dtype: str, setup: Setup) -> Iterator[Run]:
    """llama.cpp through llama-cpp-python, greedy, one request at a time, the context cleared between
    requests (no prompt reuse, as for the others)."""
    if setup.gguf is None:
        raise RuntimeError(f"no GGUF for {dtype}: pass --gguf {dtype}=PATH or --llama-cpp-src (see --help)")
    from llama_cpp import Llama

    # The KV cache in the run's dtype, as for the others: llama.cpp's default f16 cache alone makes its
    # float32 greedy output part from HF's after about half the tokens (100% agree with f32).
    kv_type = GGML_KV_TYPES[dtype]
    llm = Llama(
        model_path=str(setup.gguf),
        n_ctx=setup.extra.get("max_len", 4096),
        n_batch=512,
        n_threads=setup.threads,
        n_threads_batch=setup.threads,
        type_k=kv_type,
        type_v=kv_type,
        verbose=False,
    )

    def run(reqs: list[Request]) -> tuple[list[list[int]], int, str]:
        outputs, steps = [], 0
        for r in reqs:
            llm.reset()
            out: list[int] = []
            # temp 0 is llama.cpp's greedy sampler; generate() never stops on its own (EOS is ours to check).
            for token in llm.generate(r.prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                out.append(token)
                if len(out) == r.output_len:
                    break
            outputs.append(out)
            steps += r.output_len
        return outputs, steps, f"one at a time, {setup.gguf.name}"

    try:
        yield run
    finally:
        llm.close()


SYSTEMS: dict[str, Callable] = {
    "loom": loom_system,
    "hf-seq": hf_seq_system,
    "hf-static": hf_static_system,
    "hf-cb": hf_cb_system,
    "llama.cpp": llama_cpp_system,
}


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True
