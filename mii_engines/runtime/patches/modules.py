"""Finding the parts of a Hugging Face model that mii patches."""
from __future__ import annotations

from typing import Any, Dict, List, Optional


def attention_modules(model: Any, layers: int) -> Optional[List[Any]]:
    """Each layer's attention module (the innermost module whose ``layer_idx`` is that
    layer), in layer order; None when some layer has none or several."""
    found: Dict[int, List[Any]] = {}
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and not any(
                getattr(child, "layer_idx", None) == index for child in module.modules()
                if child is not module):
            found.setdefault(index, []).append(module)
    if sorted(found) != list(range(layers)) or any(len(m) != 1 for m in found.values()):
        return None
    return [found[index][0] for index in range(layers)]
