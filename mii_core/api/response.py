"""The result of one prompt, shaped like DeepSpeed-MII's ``Response``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional


@dataclass
class Response:
    """Generated text of one prompt. ``str(response)`` is the generated text."""

    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: str
    index: int = 0
    """Which prompt of the request this is (mii extension; useful when streaming)."""
    replica: Optional[int] = None
    """Index of the replica that served the request (mii extension)."""
    time_to_first_token_s: Optional[float] = None
    """Seconds from arrival at the replica to the first generated token (mii extension)."""
    total_time_s: Optional[float] = None
    """Seconds from arrival at the replica to the last token (mii extension)."""

    def to_msg_dict(self) -> Dict[str, Any]:
        """Plain dict of all fields (JSON-serializable)."""
        return asdict(self)

    @staticmethod
    def from_msg_dict(msg: Dict[str, Any]) -> "Response":
        """Inverse of :meth:`to_msg_dict`."""
        return Response(**msg)

    def __str__(self) -> str:
        return self.generated_text

    def __repr__(self) -> str:
        return self.generated_text
