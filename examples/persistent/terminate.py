"""Script 3 of 3: stop the deployment (every process of it) from yet another process.

    python examples/persistent/terminate.py [MODEL]
"""
import sys

import mii
from mii.testing.tiny_model import default_tiny_model_dir

MODEL = sys.argv[1] if len(sys.argv) > 1 else str(default_tiny_model_dir())
mii.client(MODEL).terminate_server()
print("terminated")
