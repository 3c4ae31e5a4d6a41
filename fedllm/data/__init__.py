"""The data layer: read local or hub data in common SFT/DPO formats and turn it into TRL datasets.

See ``docs/data.md`` for the formats and templates. Splitting one dataset into client files lives in
:mod:`fedllm.data.split` (``python -m fedllm.data.split``), not imported here so ``-m`` runs it cleanly.
"""

from fedllm.data.demo import write_demo_data
from fedllm.data.formats import FORMATS, detect_format
from fedllm.data.loading import load_dpo_dataset, load_sft_dataset
from fedllm.data.records import DataFormatError, load_records
from fedllm.data.templates import TEMPLATES, apply_template, format_response

__all__ = [
    "FORMATS",
    "TEMPLATES",
    "DataFormatError",
    "apply_template",
    "detect_format",
    "format_response",
    "load_dpo_dataset",
    "load_records",
    "load_sft_dataset",
    "write_demo_data",
]
