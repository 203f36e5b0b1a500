"""Script 2 of 3: reconnect from another process by the model's name and generate.

    python examples/persistent/reconnect.py [MODEL]
"""
import sys

import mii
from mii.testing.tiny_model import default_tiny_model_dir

MODEL = sys.argv[1] if len(sys.argv) > 1 else str(default_tiny_model_dir())
client = mii.client(MODEL)  # the deployment name defaults from the model
print(client(["DeepSpeed is", "Seattle is"], max_new_tokens=128))
for chunk in client.stream("DeepSpeed is", max_new_tokens=16):
    print(chunk.generated_text, end="", flush=True)
print()
