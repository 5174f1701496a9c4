"""`python -m tests.faulty_server serve ...`: `pagedserve serve` with one fault injected, for tests that
check a fault stays where it belongs. PAGEDSERVE_TEST_FAULT picks it:

- `detokenizer`: a request with the stop string FAULT_MARKER fails in its detokenizer (on the engine
  thread, while its outputs are made); others are untouched.
- `engine-loop`: once a request whose prompt text holds FAULT_MARKER is in the engine, its step raises
  a BaseException, which no per-request handling catches: the engine loop itself dies.
"""
from __future__ import annotations

import os
from typing import Any

FAULT_MARKER = "<inject-fault>"
FAULT_VARIABLE = "PAGEDSERVE_TEST_FAULT"


class InjectedFatalError(BaseException):
    """Stands for whatever could end the loop (a bug in the loop's own code, a KeyboardInterrupt)."""


def _inject_detokenizer_fault() -> None:
    from pagedserve.engine.detokenizer import IncrementalDetokenizer

    original_init, original_add_token = IncrementalDetokenizer.__init__, IncrementalDetokenizer.add_token

    def init(self: Any, tokenizer: Any, prompt_token_ids: list[int], params: Any) -> None:
        original_init(self, tokenizer, prompt_token_ids, params)
        self.is_faulty = FAULT_MARKER in params.stop

    def add_token(self: Any, token_id: int) -> str | None:
        if self.is_faulty:
            raise RuntimeError("injected detokenizer fault")
        return original_add_token(self, token_id)

    IncrementalDetokenizer.__init__ = init   # type: ignore[method-assign]
    IncrementalDetokenizer.add_token = add_token   # type: ignore[method-assign]


def _inject_engine_loop_fault() -> None:
    from pagedserve.engine.llm_engine import LLMEngine

    original_step = LLMEngine.step

    def step(self: Any) -> Any:
        if any(request.prompt and FAULT_MARKER in request.prompt for request in self._requests.values()):
            raise InjectedFatalError("injected engine loop fault")
        return original_step(self)

    LLMEngine.step = step   # type: ignore[method-assign]


FAULTS = {"detokenizer": _inject_detokenizer_fault, "engine-loop": _inject_engine_loop_fault}

if __name__ == "__main__":
    FAULTS[os.environ[FAULT_VARIABLE]]()
    from pagedserve.cli.main import main

    main()
