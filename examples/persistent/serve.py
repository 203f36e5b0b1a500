"""Script 1 of 3 (run each in its own process): start a persistent deployment and exit.

    python examples/persistent/serve.py [MODEL]
The deployment keeps running after this script ends.
"""
import sys

import mii
from mii.testing.tiny_model import ensure_tiny_model

MODEL = sys.argv[1] if len(sys.argv) > 1 else str(ensure_tiny_model())
client = mii.serve(MODEL)
print(client(["DeepSpeed is", "Seattle is"], max_new_tokens=128))
