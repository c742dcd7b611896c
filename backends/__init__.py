"""Where LLM calls go: the `Backend` protocol, its request/response models, and backends.

Backends depend only on their own libraries, never on `treadle.runtime`.
"""

from treadle.backends.base import (
    Backend,
    BackendError,
    Capabilities,
    LLMRequest,
    LLMResponse,
    Message,
    SchedulingHints,
    StreamChunk,
    ToolCall,
    Usage,
)
from treadle.backends.factory import create_backend
from treadle.backends.openai_compat.backend import OpenAICompatBackend
from treadle.backends.scripted import ScriptedBackend, ScriptRule
from treadle.backends.tokens import CHARS, CharTokenEstimator, TokenEstimator

__all__ = [
    "CHARS",
    "Backend",
    "BackendError",
    "Capabilities",
    "CharTokenEstimator",
    "LLMRequest",
    "LLMResponse",
    "Message",
    "OpenAICompatBackend",
    "SchedulingHints",
    "ScriptRule",
    "ScriptedBackend",
    "StreamChunk",
    "TokenEstimator",
    "ToolCall",
    "Usage",
    "create_backend",
]
