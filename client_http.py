#!/usr/bin/env python
"""A data owner's client: ``fedllm client`` (fedllm/commands/client.py)."""

import sys

from fedllm.commands.client import main, summary_table

__all__ = ["main", "summary_table"]

if __name__ == "__main__":
    sys.exit(main())
