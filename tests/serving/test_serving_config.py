"""Bad scale-out settings are refused before anything starts, naming the flag."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loom.errors import InvalidRequest
from loom.serving.config import ScaleOutConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"replicas": 0}, "replicas"),
        ({"replicas": 2, "canary": "/m", "canary_weight": 101}, "canary_weight"),
        ({"replicas": 2, "canary": "/m", "canary_weight": -1}, "canary_weight"),
        ({"canary": "/m"}, "canary"),
        ({"replicas": 1, "routing": "random"}, "routing"),
        ({"replicas": 2, "autoscale_max_replicas": 1}, "autoscale_max_replicas"),
        ({"replicas": 1, "canary_version": "stable"}, "canary_version"),
        ({"replicas": 1, "balance_rel_threshold": 0.5}, "balance_rel_threshold"),
    ],
)
def test_bad_settings_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequest) as err:
        ScaleOutConfig(**kwargs)
    assert err.value.param == param


def test_defaults_keep_the_single_process_server():
    assert ScaleOutConfig().replicas is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--replicas", "0"], "replicas must be >= 1"),
        (
            ["--replicas", "2", "--canary", "/tmp/x", "--canary-weight", "150"],
            "canary_weight must be in [0, 100]",
        ),
    ],
)
def test_loom_serve_refuses_bad_flags_without_starting(flags, message, monkeypatch):
    # In-process (a subprocess would spend seconds importing torch to print one line); anything that
    # would start a server or Ray fails the test instead.
    import types

    import loom.entrypoints.server.app as server_app
    from loom.entrypoints.cli import main

    def started(*_, **__):
        raise AssertionError("a server was started")

    monkeypatch.setattr(server_app, "create_app", started)
    monkeypatch.setitem(sys.modules, "loom.serving.app", types.SimpleNamespace(run_scale_out=started))
    with pytest.raises(SystemExit) as exit_:
        main(["serve", *flags])
    assert exit_.value.code != 0 and message in str(exit_.value.code)
