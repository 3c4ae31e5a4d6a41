"""fedllm: federated LoRA fine-tuning of LLMs over HTTP."""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed distribution's version (pyproject.toml), shown by ``fedllm --version`` and the OpenAPI spec."""
    try:
        return version("fedllm")
    except PackageNotFoundError:  # a checkout run without being installed
        return "0+unknown"
