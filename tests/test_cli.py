"""The ``fedllm`` command: every subcommand runs the same ``main`` as its top-level script, ``--version``, help, and
the exit codes (0 done, 1 a runtime failure, 2 bad usage or a refused configuration); the installed console script
runs the server under gunicorn, from any folder."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fedllm import cli, package_version
from fedllm.commands import EXIT_OK, EXIT_USAGE
from fedllm.localserver import child_pids, free_port
from fedllm.server.auth import TokenRegistry

# subcommand -> the top-level script that runs the same main
SCRIPTS = {"server": "server_http", "client": "client_http", "simulate": "simulate", "evaluate": "evaluate",
           "export": "export", "config": "config"}



def exit_code(argv: list[str]) -> int:
    """``fedllm ARGV``'s exit code, whether main returns it or argparse exits with it."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def test_version_help_and_usage_errors(capsys) -> None:
    assert exit_code(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"fedllm {package_version()}"
    assert package_version() == "0.1.0"  # pyproject.toml's version, read from the installed metadata
    assert exit_code(["--help"]) == EXIT_OK
    help_text = capsys.readouterr().out
    assert all(f"\n  {name} " in help_text for name in cli.COMMANDS)
    assert "2  bad usage" in help_text and "1  a runtime failure" in help_text
    assert list(cli.COMMANDS) == ["server", "client", "simulate", "evaluate", "export", "split", "config"]
    assert exit_code([]) == EXIT_USAGE
    assert exit_code(["train"]) == EXIT_USAGE
    assert "invalid choice: 'train'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_subcommand_runs_the_main_of_its_script(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    module_name, function_name = cli.COMMANDS[command][0].split(":")
    module = importlib.import_module(module_name)
    if command == "server":  # `fedllm server` is server_http.py's main under gunicorn, as run_server.sh
        target, expected = "main", ["--use_gunicorn", "--port", "9"]
    else:
        target, expected = function_name, ["--port", "9"]
    if command in SCRIPTS:
        assert importlib.import_module(SCRIPTS[command]).main is getattr(module, target)
    calls: list[list[str]] = []
    monkeypatch.setattr(module, target, lambda argv: calls.append(argv) or 7)
    assert cli.main([command, "--port", "9"]) == 7  # the command's own exit code
    assert calls == [expected]


def test_a_subcommand_names_itself_in_its_usage(capsys) -> None:
    assert exit_code(["client", "--no_such_option", "1"]) == EXIT_USAGE
    assert "fedllm client: error: unrecognized arguments: --no_such_option 1" in capsys.readouterr().err
    assert exit_code(["split", "--help"]) == EXIT_OK
    assert exit_code(["export", "--help"]) == EXIT_OK and "fedllm export adapter" in capsys.readouterr().out


def test_config_prints_every_option_group(capsys) -> None:
    assert exit_code(["config"]) == EXIT_OK
    assert capsys.readouterr().out.count("\n== ") == 8  # nine groups; the first starts the output
    assert exit_code(["config", "--everything"]) == EXIT_USAGE


def test_split_writes_the_clients_files(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(10)))
    assert exit_code(["split", str(data), "--num_clients", "2", "--output_dir", str(tmp_path / "out")]) == EXIT_OK
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["client_0.jsonl", "client_1.jsonl"]
    assert exit_code(["split", str(tmp_path / "missing.jsonl"), "--num_clients", "2", "--output_dir", "x"]) == EXIT_USAGE


def test_token_commands_run_under_fedllm_server(tmp_path: Path, capsys) -> None:
    tokens = tmp_path / "tokens.json"
    assert exit_code(["server", "add-client", "--auth_tokens", str(tokens), "--client_id", "alice"]) == EXIT_OK
    token = capsys.readouterr().out.strip()
    assert TokenRegistry(tokens).identify(token).client_id == "alice"
    assert exit_code(["server", "revoke", "--auth_tokens", str(tokens), "--client_id", "alice"]) == EXIT_OK
    assert exit_code(["server", "revoke", "--auth_tokens", str(tokens), "--client_id", "alice"]) == EXIT_USAGE
    assert "has no token for client 'alice'" in capsys.readouterr().err


def test_refused_configurations_exit_2_with_one_line(tmp_path: Path, capsys, restore_logging) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text("{}")
    # Tokens over plain HTTP on a public address: refused before the state_dir is touched.
    assert exit_code(["server", "--model_name_or_path", "m", "--state_dir", str(tmp_path / "state"),
                      "--auth_tokens", str(tokens), "--host", "0.0.0.0"]) == EXIT_USAGE
    assert "--allow_insecure_http" in capsys.readouterr().err and not (tmp_path / "state").exists()
    assert exit_code(["simulate", "--output_dir", str(tmp_path / "sim")]) == EXIT_USAGE  # no base model
    assert "--model_name_or_path is required" in capsys.readouterr().err
    assert exit_code(["evaluate", "--output_file", str(tmp_path / "eval.json")]) == EXIT_USAGE
    assert exit_code(["export", "merge"]) == EXIT_USAGE  # neither --adapter nor --state_dir
    # A --config file that cannot be read or names unknown options: the same one-line refusal as a bad flag.
    assert exit_code(["simulate", "--config", str(tmp_path / "missing.yaml")]) == EXIT_USAGE
    (tmp_path / "bad.yaml").write_text("no_such_option: 1\n")
    assert exit_code(["client", "--config", str(tmp_path / "bad.yaml")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "error: --config:" in err and "unknown options ['no_such_option']" in err and "Traceback" not in err


@pytest.mark.integration
def test_the_installed_console_script_serves_with_gunicorn(tiny_model_dir: Path, tmp_path: Path) -> None:
    fedllm = Path(sys.executable).parent / "fedllm"  # what pip install -e . made from [project.scripts]
    version = subprocess.run([str(fedllm), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"fedllm {package_version()}"
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([str(fedllm), "server", "--model_name_or_path", str(tiny_model_dir), "--state_dir",
                                   str(tmp_path / "state"), "--num_clients", "1", "--sample_clients", "1",
                                   "--peft_lora_r", "4", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None and time.time() < deadline, log.read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        spec = requests.get(f"http://127.0.0.1:{port}/v1/openapi.json", timeout=30)
        assert spec.status_code == 200 and spec.json()["info"]["version"] == package_version()
        assert len(child_pids(server.pid)) == 2  # gunicorn's master and its two workers, as run_server.sh
        assert "Booting worker" in log.read_text()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
