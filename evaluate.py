#!/usr/bin/env python
"""Evaluate a base model plus an adapter: ``fedllm evaluate`` (fedllm/commands/evaluate.py)."""

import sys

from fedllm.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
