"""Engine, server and model configuration: frozen dataclasses validated at construction.

`EngineConfig` and `ServerConfig` hold what a user chooses (their fields become the CLI flags);
`ModelConfig` holds what the checkpoint dictates and is built from a transformers config, whatever
format the weights came in.
"""
from pagedserve.config.engine import DEFAULT_MODEL, DTYPE_CHOICES, OMP_WAIT_POLICIES, EngineConfig
from pagedserve.config.model import ModelConfig, token_ids
from pagedserve.config.server import (GENERATION_CONFIG_CHOICES, REASONING_PARSERS, TOOL_CALL_PARSERS,
                                      UVICORN_LOG_LEVELS, ServerConfig)

__all__ = ["DEFAULT_MODEL", "DTYPE_CHOICES", "GENERATION_CONFIG_CHOICES", "OMP_WAIT_POLICIES", "REASONING_PARSERS", "TOOL_CALL_PARSERS",
           "UVICORN_LOG_LEVELS", "EngineConfig", "ModelConfig", "ServerConfig", "token_ids"]
