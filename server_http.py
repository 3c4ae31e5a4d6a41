#!/usr/bin/env python
"""The parameter server, on Flask's development server unless --use_gunicorn: ``fedllm server`` (fedllm/commands/server.py)."""

import sys

from fedllm.commands.server import check_transport, main

__all__ = ["check_transport", "main"]

if __name__ == "__main__":
    sys.exit(main())
