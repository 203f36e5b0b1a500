"""The main job: serve the bundled tiny model, generate once, terminate.

    python examples/quickstart.py [MODEL]

Without MODEL it builds (once) the offline tiny Llama from ``mii.testing.tiny_model``.
"""
import sys

import mii
from mii.testing.tiny_model import ensure_tiny_model

model = sys.argv[1] if len(sys.argv) > 1 else str(ensure_tiny_model())
client = mii.serve(model)
try:
    # Greedy (MII samples by default): the same text on every run.
    responses = client(["DeepSpeed is", "Seattle is"], max_new_tokens=32, do_sample=False)
    for response in responses:
        print(f"{response.prompt_length} prompt tokens -> {response.generated_length} new "
              f"tokens ({response.finish_reason}): {response.generated_text!r}")
finally:
    client.terminate_server()
print("terminated")
