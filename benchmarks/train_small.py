"""Train a small Llama on the Python standard library's source, so quantization accuracy and prompt-lookup
speculative decoding can be measured on a model that does something (random weights never copy their
context, and their greedy loops flatter prompt lookup).

The corpus ships with Python (`sysconfig.get_paths()["stdlib"]`); about 5% of its files (chosen by a hash
of the path) are held out for evaluation. A byte-level BPE tokenizer is trained on the rest with
`tokenizers`; half the training rows show a span of code twice, so the model learns to copy from its
context (an induction circuit) on top of predicting code. That alone (3,000 steps, version 1) left a model
that copied only partly (53% of a repeated chunk's tokens, teacher-forced). A second phase (version 2:
steps 3,000 to 5,000; the first phase is version 1's, unchanged, so a version-1 `.work` directory renamed
to the version-2 name resumes from it) adds rows that repeat a span of random tokens: nothing but the
earlier copy predicts those, which is what forms the circuit; the code rows keep it working on real code.

The result is an HF-format directory (config.json, model.safetensors, tokenizer files with a ChatML
template) that loom and HF transformers both load, cached at
`$XDG_CACHE_HOME/loom/trained/stdlib-llama-<version>` (default `~/.cache/...`). Rebuild it with

    nice -n 10 .venv/bin/python benchmarks/train_small.py            # 5,000 steps; resumes if cut off
    .venv/bin/python benchmarks/train_small.py --check-only          # the copy check on the cached model

The last step of training is the copy check (`check_copy`): on held-out code shown twice, how often the
model predicts the second copy's next token greedily (teacher-forced), and how much of the second copy
loom reproduces when generating greedily from its first few tokens. A model that does not copy is
reported as such (exit status 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from loom.models.tiny import SPECIAL_TOKENS, build_tokenizer
from loom.paths import cache_dir

# Bump when the data, tokenizer, model shape or schedule changes, so the cached model is rebuilt.
VERSION = "2"
VOCAB_SIZE = 4096
EOS = SPECIAL_TOKENS[0]
# Sized for a 2-core CPU: ~1.5 CPU-seconds a step (2,048 tokens), so 3,000 steps take ~40 minutes on two
# idle cores. (6 layers at 8 x 512 tokens a step cost 5.3 s a step on one core.)
SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,  # a multiple of 128 so int4 group sizes 32-128 all divide down_proj's input
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)
# Rows as long as the prompts prompt lookup will be measured on: copying must work at these distances.
SEQ_LEN = 512
BATCH = 4
HELD_OUT_PERCENT = 5
# Phase 1 (steps [0, PHASE1_STEPS)): code, half the rows with a span of it repeated; cosine from --lr.
# Phase 2 (to --steps): also rows repeating random tokens; a second cosine from half of --lr.
PHASE1_STEPS = 3000
PHASE2_MIX = (0.3, 0.4)  # shares of rows repeating random tokens, and repeating code; the rest plain code


def model_dir() -> Path:
    return cache_dir("trained", f"stdlib-llama-v{VERSION}")


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) .py files of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts)
    train, held = [], []
    for f in files:
        digest = hashlib.sha256(str(f.relative_to(root)).encode()).digest()
        (held if digest[0] % 100 < HELD_OUT_PERCENT else train).append(f)
    return train, held


def read(f: Path) -> str:
    return f.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path]):
    return build_tokenizer((read(f) for f in files), vocab_size=VOCAB_SIZE, model_max_length=2048)


def encode_stream(tokenizer, files: list[Path]) -> np.ndarray:
    """All files' tokens in one array, each file followed by the end-of-text token."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    out: list[int] = []
    for i in range(0, len(files), 64):
        for ids in tokenizer([read(f) for f in files[i : i + 64]], add_special_tokens=False)["input_ids"]:
            out.extend(ids)
            out.append(eos)
    return np.asarray(out, dtype=np.int16)


def sample_row(stream: np.ndarray, rng: random.Random, step: int) -> tuple[np.ndarray, slice]:
    """SEQ_LEN + 1 tokens of code, in which (per the phase's mix) a span appears again later, a span of
    code or of random tokens. Also returns where the repeat sits in the row (empty if none)."""
    start = rng.randrange(len(stream) - SEQ_LEN - 1)
    base = stream[start : start + SEQ_LEN + 1]
    u = rng.random()
    random_share, repeated = (0.0, 0.5) if step < PHASE1_STEPS else PHASE2_MIX
    if u >= random_share + repeated:
        return base, slice(0, 0)
    if u < random_share:
        # tokens drawn uniformly from the vocabulary: nothing but the earlier copy predicts them
        first = len(SPECIAL_TOKENS)
        base = np.asarray([rng.randrange(first, VOCAB_SIZE) for _ in range(SEQ_LEN + 1)], dtype=stream.dtype)
    span = rng.randint(16, 192)
    gap = rng.randint(0, SEQ_LEN - 2 * span)
    at = rng.randint(0, SEQ_LEN - 2 * span - gap)
    # [code before][span][other code][span again][code after], cut to length
    row = np.concatenate([base[: at + span + gap], base[at : at + span], base[at + span + gap :]])
    again = at + span + gap
    return row[: SEQ_LEN + 1], slice(again, again + span)


def make_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", EOS)]
    config = LlamaConfig(
        **SHAPE,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, max_steps: int, peak: float) -> float:
    """Phase 1: warm-up and cosine to a tenth of `peak` over PHASE1_STEPS; phase 2 starts again from half."""
    if step < PHASE1_STEPS:
        return _cosine(step, PHASE1_STEPS, peak, warmup=100)
    return _cosine(step - PHASE1_STEPS, max_steps - PHASE1_STEPS, peak / 2, warmup=50)


def _cosine(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(args: argparse.Namespace, out: Path) -> None:
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    train_files, held_files = stdlib_files()
    if (work / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(work)
    else:
        t0 = time.time()
        # A third of the files is plenty for 4,096 merges, and BPE training time grows faster than the text.
        tokenizer = train_tokenizer(train_files[::3])
        tokenizer.save_pretrained(work)
        print(f"tokenizer: {len(tokenizer)} tokens in {time.time() - t0:.0f} s", flush=True)
    stream_file = work / "train_tokens.npy"
    if stream_file.is_file():
        stream = np.load(stream_file)
    else:
        stream = encode_stream(tokenizer, train_files)
        np.save(stream_file, stream)
    print(f"corpus: {len(train_files)} files, {len(stream):,} tokens; {len(held_files)} held out", flush=True)

    torch.manual_seed(0)
    model = make_model(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    step = 0
    ckpt = work / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.1f}M parameters, {SHAPE}", flush=True)

    model.train()
    t0, tokens_done, copy_hits, copy_total = time.time(), 0, 0, 0
    while step < args.steps:
        rng = random.Random(step)  # the batch depends on the step only, so a resumed run sees the same data
        rows, spans = zip(*(sample_row(stream, rng, step) for _ in range(BATCH)), strict=True)
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # [BATCH, SEQ_LEN, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_done += batch[:, :-1].numel()
        with torch.no_grad():  # greedy accuracy on the repeated spans (past their first 4 tokens): copying
            pred = logits.argmax(-1)
            for b, span in enumerate(spans):
                if span.stop - span.start > 4:
                    hits = pred[b, span.start + 3 : span.stop - 1] == batch[b, span.start + 4 : span.stop]
                    copy_hits, copy_total = copy_hits + hits.sum().item(), copy_total + hits.numel()
        if step % 50 == 0 or step == args.steps:
            rate = tokens_done / (time.time() - t0)
            print(
                f"step {step}/{args.steps} loss {loss.item():.3f} copy accuracy {copy_hits / max(1, copy_total):.3f} "
                f"{rate:.0f} tok/s, {(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
            copy_hits = copy_total = 0
        if step % 250 == 0 or step == args.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)

    save(model, tokenizer, out)


def save(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp, save_jinja_files=False)
    eos_ids = model.config.eos_token_id
    GenerationConfig(
        bos_token_id=None, eos_token_id=eos_ids, pad_token_id=model.config.pad_token_id
    ).save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.update(torch_dtype="float32", rope_theta=10000.0)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    print(f"saved {out}", flush=True)


def held_out_chunks(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """n spans of `length` tokens from different held-out files (fixed by seed)."""
    _, held = stdlib_files()
    rng = random.Random(seed)
    chunks: list[list[int]] = []
    for f in rng.sample(held, len(held)):
        ids = tokenizer.encode(read(f), add_special_tokens=False)
        if len(ids) < length + 1:
            continue
        start = rng.randrange(len(ids) - length)
        chunks.append(ids[start : start + length])
        if len(chunks) == n:
            break
    return chunks


def check_copy(out: Path, n: int = 32, length: int = 128, shown: int = 8) -> dict:
    """On held-out code shown twice: teacher-forced greedy accuracy over the second copy (HF), and the
    share of the second copy loom generates greedily, token for token, from its first `shown` tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loom import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(out)
    chunks = held_out_chunks(tokenizer, n, length)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    first_copy_hits = second_copy_hits = 0
    with torch.inference_mode():
        for chunk in chunks:
            ids = torch.tensor([chunk + chunk])
            pred = hf(ids).logits[0].argmax(-1)
            # position p predicts token p + 1: the first copy measures plain code prediction, the second
            # (from its `shown`-th token on) copying.
            first_copy_hits += (pred[shown - 1 : length - 1] == ids[0, shown:length]).sum().item()
            second_copy_hits += (pred[length + shown - 1 : -1] == ids[0, length + shown :]).sum().item()
    per_copy = len(chunks) * (length - shown)

    llm = LLM(model=str(out), dtype="float32", num_threads=2)
    prompts = [chunk + chunk[:shown] for chunk in chunks]
    params = SamplingParams(max_tokens=length - shown, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    exact_prefix = []
    matched = 0
    for chunk, o in zip(chunks, outs, strict=True):
        got, want = o.outputs[0].token_ids, chunk[shown:]
        matched += sum(a == b for a, b in zip(got, want, strict=False))
        agree = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(want))
        exact_prefix.append(agree)
    result = {
        "chunks": len(chunks),
        "chunk_tokens": length,
        "shown_tokens": shown,
        "teacher_forced_accuracy_first_copy": first_copy_hits / per_copy,
        "teacher_forced_accuracy_second_copy": second_copy_hits / per_copy,
        "greedy_generation_token_match": matched / per_copy,
        "greedy_generation_fully_copied": sum(a == length - shown for a in exact_prefix) / len(chunks),
        "greedy_generation_mean_exact_prefix": sum(exact_prefix) / len(chunks),
    }
    (out / "copy_check.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--check-only", action="store_true", help="only run the copy check on the cached model"
    )
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default {model_dir()})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = (args.out or model_dir()).expanduser().absolute()
    if not args.check_only:
        if (out / "config.json").is_file():
            print(f"{out} exists; delete it to retrain", flush=True)
        else:
            train(args, out)
    result = check_copy(out)
    print(json.dumps(result, indent=2))
    # "Copies": most of the second copy is predicted, far above the first copy's plain-code accuracy.
    copies = result["teacher_forced_accuracy_second_copy"] >= 0.9
    print("copies from context: " + ("yes" if copies else "NO"))
    return 0 if copies else 1


if __name__ == "__main__":
    sys.exit(main())
