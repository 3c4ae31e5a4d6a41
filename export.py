#!/usr/bin/env python
"""Export, merge and try out an adapter: ``fedllm export adapter|merge|generate`` (fedllm/commands/export.py)."""

import sys

from fedllm.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
