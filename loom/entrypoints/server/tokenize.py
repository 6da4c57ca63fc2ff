"""The tokenizer over HTTP, as vLLM serves it: POST /tokenize, POST /detokenize, GET /tokenizer_info; and
GET /version. lm-evaluation-harness's local-completions finds the tokenizer through these (its remote
tokenizer backend probes /tokenizer_info and /tokenize), so it needs no copy of the model's files.
Tokenizing runs on a frontend worker thread, never on the event loop."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, model_validator

from loom.entrypoints.server.openapi import errors
from loom.entrypoints.server.protocol import ChatMessage, OpenAIModel, TokenId, ToolDefinition, check_unicode
from loom.entrypoints.server.serving import ServerState
from loom.errors import InvalidRequest


class _TextRequest(OpenAIModel):
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        check_unicode(data)
        return data


class TokenizeRequest(_TextRequest):
    """Either `prompt` (text, special tokens added unless add_special_tokens is false) or `messages`
    (rendered through the chat template, as chat completions would)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None
    add_special_tokens: bool | None = None
    """Default: true for a prompt, false for messages (the template writes its own)."""
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_TextRequest):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What a client needs to tokenize as the server does (lm-evaluation-harness's remote tokenizer)."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int


class Version(BaseModel):
    version: str


def loom_version() -> str:
    try:
        return version("loom")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def install_tokenizer_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize", response_model=TokenizeResponse, responses=errors(404, 503))
    async def tokenize(body: TokenizeRequest) -> dict:
        """Token ids of a prompt, or of a conversation rendered through the chat template."""
        state.check_model(body.model)
        ip = state.require_input()
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequest("give exactly one of prompt and messages", param="prompt")

        def run() -> list[int]:
            if body.prompt is not None:
                add = True if body.add_special_tokens is None else body.add_special_tokens
                return ip.encode(body.prompt, add_special_tokens=add)
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            text_chars = sum(
                len(m.get("content") or "") for m in messages if isinstance(m.get("content"), str)
            )
            ip.check_chars(text_chars, "messages")
            text = ip.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=body.add_generation_prompt
            )
            return ip.encode(text, "messages", add_special_tokens=bool(body.add_special_tokens))

        tokens = await state.in_thread(run)
        strs = None
        if body.return_token_strs:
            strs = [ip.tokenizer.hf.convert_ids_to_tokens(t) for t in tokens]
        return TokenizeResponse(
            count=len(tokens), max_model_len=ip.max_model_len, tokens=tokens, token_strs=strs
        ).model_dump(exclude_none=True)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=errors(404, 503))
    async def detokenize(body: DetokenizeRequest) -> dict:
        """The text of token ids (special tokens included)."""
        state.check_model(body.model)
        ip = state.require_input()
        vocab = ip.tokenizer.vocab_size
        bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        text = await state.in_thread(lambda: ip.tokenizer.decode(body.tokens, skip_special_tokens=False))
        return {"prompt": text}

    @app.get("/tokenizer_info", response_model=TokenizerInfo, responses=errors(503))
    async def tokenizer_info() -> dict:
        """The tokenizer's special tokens, chat template and limits."""
        ip = state.require_input()
        hf = ip.tokenizer.hf
        template = hf.chat_template
        if isinstance(template, dict):
            template = template.get("default") or next(iter(template.values()), None)
        return TokenizerInfo(
            tokenizer_class=type(hf).__name__,
            eos_token=hf.eos_token,
            bos_token=hf.bos_token,
            pad_token=hf.pad_token,
            chat_template=template,
            model_max_length=ip.max_model_len,
            vocab_size=ip.tokenizer.vocab_size,
        ).model_dump()

    @app.get("/version", response_model=Version, responses=errors())
    async def server_version() -> dict:
        return {"version": loom_version()}
