"""Test-wide environment, set at import time before triton or huggingface_hub are imported.

* ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors through the interpreter.
* ``HF_HUB_OFFLINE=1``: tests never touch the network.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
