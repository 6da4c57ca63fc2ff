"""`loom run-batch -i in.jsonl -o out.jsonl`: the batch file run offline through the server's own API,
in vLLM's run-batch output format, in input order, failed lines included."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO
from tests.jobs.conftest import chat_line, jsonl, read_jsonl


def test_run_batch_writes_one_answer_per_line_in_order(tiny_llama_dir, tmp_path):
    lines = [
        chat_line("a", "Hello there", max_tokens=5),
        {
            "custom_id": "b",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Once", "max_tokens": 3, "temperature": 0},
        },
        {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
        chat_line("a-again", "Hello there", max_tokens=5),
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(jsonl(lines))
    cmd = [
        sys.executable,
        "-m",
        "loom.entrypoints.cli",
        "--log-level",
        "WARNING",
        "run-batch",
        "-i",
        str(src),
        "-o",
        str(dst),
    ]
    cmd += [
        "--served-model-name",
        "loom-test",
        "--model",
        str(tiny_llama_dir),
        "--num-threads",
        "1",
        "--num-blocks",
        "256",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = read_jsonl(dst.read_text())
    assert [o["custom_id"] for o in out] == ["a", "b", "bad", "a-again"]
    a, b, bad, again = out
    assert a["response"]["status_code"] == 200 and a["error"] is None
    assert (
        a["response"]["body"]["object"] == "chat.completion"
        and a["response"]["body"]["usage"]["completion_tokens"] == 5
    )
    assert b["response"]["body"]["object"] == "text_completion"
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"]["error"]["param"] == "messages"
    assert again["response"]["body"]["choices"] == a["response"]["body"]["choices"]  # greedy: same answer
    assert len({o["id"] for o in out}) == 4
