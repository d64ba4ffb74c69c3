"""blossom as an MLflow pyfunc model: prompts in, PNG images out.

Logged from code (MLflow's models-from-code: this file is the model's definition, nothing is
pickled), with the trained model folder as its artifact, so that
`mlflow.pyfunc.load_model("models:/blossom@champion")` and `mlflow models serve` work on any
registered version. Input: a column `prompt`; params: sampler, steps, guidance, seed; output: a
column `image` of base64-encoded PNGs.
"""

from __future__ import annotations

import base64

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from blossom.config import SampleConfig
from blossom.sampling import FAST_SAMPLER

ARTIFACT = "blossom"  # the name of the trained model folder among the pyfunc's artifacts
PARAMS = {"sampler": SampleConfig.sampler, "steps": SampleConfig.steps, "guidance": SampleConfig.guidance, "seed": 0}
FAST_PARAMS = {**PARAMS, "sampler": FAST_SAMPLER, "steps": 4}  # a distilled (`fast`) model's defaults


def png_base64(image) -> str:
    from blossom.images import png_bytes

    return base64.b64encode(png_bytes(image)).decode()


class TextToImage(PythonModel):
    def load_context(self, context) -> None:
        from blossom.backends import TorchBackend

        self.backend = TorchBackend(context.artifacts[ARTIFACT])

    # The DataFrame hint tells MLflow the logged signature (a `prompt` column) is the schema, and
    # spares every load its warning that predict has no type hints.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from blossom.sampling import check_request, sample

        prompts = [str(p) for p in (model_input["prompt"] if hasattr(model_input, "columns") else model_input)]
        p = {**PARAMS, **(params or {})}
        check_request(p["sampler"], int(p["steps"]), float(p["guidance"]), int(p["seed"]))
        images = sample(self.backend, prompts, p["sampler"], int(p["steps"]), float(p["guidance"]), int(p["seed"]))
        return pd.DataFrame({"image": [png_base64(img) for img in images]})


mlflow.models.set_model(TextToImage())
