"""SpeculativeConfig: parsed from `--speculative-config` JSON (vLLM's field names)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from loom.errors import InvalidRequest

METHODS = ("ngram", "suffix")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    """ngram (prompt lookup in the request's own tokens) or suffix (the longest match in the request
    and the earlier requests of its agent program)."""
    num_speculative_tokens: int = 4
    """Most draft tokens proposed per step for one request."""
    prompt_lookup_min: int = 2
    """Shortest suffix (in tokens) that must match earlier text before a continuation is proposed."""
    prompt_lookup_max: int = 5
    """Longest suffix the ngram method tries to match (the suffix method matches as long as it can)."""
    adaptive: bool = True
    """Back off for a request whose drafts keep being rejected (and so cost a verify for nothing)."""
    disable_by_batch_size: int = 0
    """Propose nothing in steps with more running requests than this (large batches are compute-bound,
    where verifying rejected tokens is not free); 0 never disables."""
    max_program_tokens: int = 16384
    """suffix: most tokens of one program's earlier requests kept for matching (oldest dropped first)."""

    @classmethod
    def parse(cls, value: str | dict | SpeculativeConfig | None) -> SpeculativeConfig | None:
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidRequest(
                    f"speculative_config is not valid JSON: {e}", "speculative_config"
                ) from e
        if not isinstance(value, dict):
            raise InvalidRequest("speculative_config must be a JSON object", param="speculative_config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidRequest(
                f"speculative_config has unknown fields {unknown}; known: {sorted(known)}",
                param="speculative_config",
            )
        config = cls(**value)
        config.validate()
        return config

    def validate(self) -> None:
        def bad(why: str) -> InvalidRequest:
            return InvalidRequest(f"speculative_config: {why}", param="speculative_config")

        if self.method not in METHODS:
            raise bad(f"method must be one of {METHODS}, got {self.method!r}")
        for name in (
            "num_speculative_tokens",
            "prompt_lookup_min",
            "prompt_lookup_max",
            "max_program_tokens",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name} must be an integer >= 1, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise bad("prompt_lookup_min must not exceed prompt_lookup_max")
        if self.num_speculative_tokens > 64:
            raise bad("num_speculative_tokens may be at most 64")
        if not isinstance(self.disable_by_batch_size, int) or self.disable_by_batch_size < 0:
            raise bad(f"disable_by_batch_size must be an integer >= 0, got {self.disable_by_batch_size!r}")
