"""`loom serve` with faults injected for the reliability tests. The hooks live here, in tests, never in
loom's code: they wrap the real model and scheduler classes, then run the real CLI.

A request whose prompt holds one of these token ids triggers the fault:
- POISON: the model's forward raises whenever that token is in the step's batch (a fault of one request
  inside the step: the engine must find it and fail only that request);
- KILL: the scheduler raises while applying a step that ran it (a fault outside the guarded forward: the
  engine loop dies, and the server must fail every request, turn unready and exit non-zero);
- HANG: the forward blocks for an hour (the watchdog must notice the stuck step and do the same).
"""

from __future__ import annotations

import sys
import time

from loom.engine.scheduler import Scheduler
from loom.entrypoints.cli import main
from loom.models.llama import LlamaForCausalLM

POISON, KILL, HANG = 2001, 2002, 2003

_forward = LlamaForCausalLM.forward
_update = Scheduler.update_from_output


def forward(self, input_ids, *args, **kwargs):
    ids = set(input_ids.tolist())
    if POISON in ids:
        raise RuntimeError("injected fault: poisoned request in the batch")
    if HANG in ids:
        time.sleep(3600)
    return _forward(self, input_ids, *args, **kwargs)


def update_from_output(self, sched, result):
    for req_id in sched.num_scheduled_tokens:
        req = self.requests.get(req_id)
        if req is not None and KILL in req.prompt_token_ids:
            raise RuntimeError("injected fault: the engine loop dies")
    return _update(self, sched, result)


LlamaForCausalLM.forward = forward
Scheduler.update_from_output = update_from_output

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
