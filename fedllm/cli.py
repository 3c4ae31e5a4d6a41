"""``fedllm``: one command for every program of fedllm (the console script that ``pip install`` makes).

Each subcommand runs the same ``main`` as its top-level script (:mod:`fedllm.commands`), with the same
options; ``fedllm COMMAND --help`` lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import package_version
from .commands import EXIT_OK

# subcommand -> (its main, "module:function"; what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "server": ("fedllm.commands.server:gunicorn_main",
               "the parameter server, under gunicorn (run_server.sh); add-client|add-admin|add-viewer|revoke: tokens"),
    "client": ("fedllm.commands.client:main", "a data owner's client (client_http.py, run_client.sh)"),
    "simulate": ("fedllm.commands.simulate:main", "N clients in one process, on the same code (simulate.py)"),
    "evaluate": ("fedllm.commands.evaluate:main", "loss and generation metrics of an adapter (evaluate.py)"),
    "export": ("fedllm.commands.export:main", "adapter|merge|generate, from a state_dir or an adapter (export.py)"),
    "split": ("fedllm.data.split:main", "one dataset into per-client files (python -m fedllm.data.split)"),
    "config": ("fedllm.commands.config:main", "every option, grouped and documented (config.py)"),
}
EXIT_CODES = """exit codes:
  0  done
  1  a runtime failure (an unexpected error; its traceback is printed)
  2  bad usage, or a configuration or input the command refuses (one line says why)"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="fedllm", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Federated LoRA fine-tuning of LLMs over HTTP.\n\ncommands:\n" + listing,
        epilog="'fedllm COMMAND --help' lists a command's options.\n\n" + EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"fedllm {package_version()}")
    parser.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help=", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    if not argv:  # argparse would also call the optional REMAINDER required
        parser.error("give a COMMAND (fedllm --help lists them)")
    parsed = parser.parse_args(argv)
    module_name, function_name = COMMANDS[parsed.command][0].split(":")
    command_main = getattr(importlib.import_module(module_name), function_name)
    program = sys.argv[0]
    sys.argv[0] = f"fedllm {parsed.command}"  # the prog of the command's own argparse usage and errors
    try:
        code = command_main(parsed.args)
    finally:
        sys.argv[0] = program
    return EXIT_OK if code is None else code


if __name__ == "__main__":
    sys.exit(main())
