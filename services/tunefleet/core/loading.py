"""One model load at a time in a process.

transformers builds a model under process-wide state: it sets torch's default dtype for the
build and restores it after, and ties shared weights through bookkeeping of its own. Two threads
loading at once interleave that state: on transformers 5.24, 54 of 60 loads of a tiny Llama by
three threads (bfloat16 and float32) came out with wrong logits (untied or random output
weights), and the process's default dtype was left as bfloat16. Every service loads models in
worker threads (the registry's smoke tests, merges and export checks, the PEFT engine), and the
embedded server runs them all in one process: each load holds `LOADING`.
"""

from __future__ import annotations

import threading

LOADING = threading.RLock()
