#!/usr/bin/env python
"""Every fedllm option, grouped and documented: ``fedllm config`` (fedllm/commands/config.py)."""

import sys

from fedllm.commands.config import main

if __name__ == "__main__":
    sys.exit(main())
