"""LangChain against a real `loom serve` (tiny model): `with_structured_output` (its default method,
which is OpenAI's json_schema response_format, and function calling) and `bind_tools(...,
tool_choice="required")` return parsed objects and valid tool calls, because the engine constrains the
output. The model has random weights, so the schemas bound their strings and the client closes objects."""

from __future__ import annotations

import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field


class City(BaseModel):
    """A city and how many people live there."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=16)
    population: int = Field(ge=0, le=10_000_000)


class GetWeather(BaseModel):
    """Look up the weather in a city."""

    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=12)
    unit: str = Field(pattern="^(C|F)$")


@pytest.fixture(scope="module")
def llm(launch_server) -> ChatOpenAI:
    server = launch_server("langchain", api_key="sk-lc").wait_ready()
    return ChatOpenAI(
        base_url=server.url + "/v1", api_key="sk-lc", model=server.model, temperature=0, max_tokens=300,
        max_retries=0, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("method", [None, "json_schema", "function_calling"])
def test_with_structured_output_returns_the_model(llm, method):
    kwargs = {} if method is None else {"method": method}
    structured = llm.with_structured_output(City, **kwargs)
    city = structured.invoke("Name a city and its population.")
    assert isinstance(city, City)
    assert 0 <= city.population <= 10_000_000 and len(city.name) <= 16


def test_bind_tools_with_tool_choice_required(llm):
    bound = llm.bind_tools([GetWeather], tool_choice="required")
    message = bound.invoke("What is the weather in Paris?")
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call["name"] == "GetWeather"
        GetWeather.model_validate(call["args"])
