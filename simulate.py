#!/usr/bin/env python
"""N clients in one process, on the same code as the HTTP deployment: ``fedllm simulate`` (fedllm/commands/simulate.py)."""

import sys

from fedllm.commands.simulate import main

if __name__ == "__main__":
    sys.exit(main())
