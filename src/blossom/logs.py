"""Logging for the `blossom` command: blossom's own progress, and third-party messages only when a
user can act on them.

Known and harmless on every run (checked against the libraries' code): ONNX Runtime's quantizer
asking for model pre-processing (blossom's graphs are already optimised), the ONNX exporter and
transformers noting that torchvision is absent (blossom uses neither torchvision op nor its image
processors), onnxscript's constant folder skipping a node it cannot fold, and DeepSpeed saying it
found no GPU on a CPU machine.
"""

from __future__ import annotations

import logging

# logger name -> words that mark a warning of it as known and harmless
KNOWN_HARMLESS = {
    "": ("pre-processing before quantization",),
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}
# loggers whose warnings are all of that kind
QUIET = {
    "onnxscript": logging.ERROR,
    "onnxscript.optimizer._constant_folding": logging.ERROR,
    "onnx_ir": logging.ERROR,
    "torch.onnx": logging.ERROR,
    "torch.onnx._internal.exporter._registration": logging.ERROR,
    "httpx": logging.WARNING,
    "urllib3": logging.WARNING,
    "filelock": logging.WARNING,
    "alembic": logging.WARNING,
    "mlflow": logging.WARNING,
    "aiobotocore": logging.WARNING,
    "botocore": logging.WARNING,
}


class _DropKnown(logging.Filter):
    def __init__(self, words: tuple[str, ...]):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not any(w in record.getMessage() for w in self.words)


def setup(verbose: bool = False, rank: int = 0, world: int = 1) -> None:
    """blossom's log format and level (each line tagged with its rank when several processes
    write to one terminal); known third-party noise silenced unless verbose."""
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=f"%(levelname)s {tag}%(name)s: %(message)s"
    )
    if verbose:
        return
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)
    for name, words in KNOWN_HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(words))
