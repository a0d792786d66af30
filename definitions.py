"""The Dagster code location: `dagster dev -w workspace.yaml`, `dagster job execute -f definitions.py`,
`dg list defs` / `dg check defs` (pyproject's [tool.dg] points `dg` here).

With no settings it holds the demo pipeline (SmolLM2 on the bundled prompts), an embedding
pipeline (all-MiniLM-L6-v2 on bundled sentences), local Ray, and outputs under
./.llm_assets/storage. Add your own pipelines to PIPELINES (Python), or as YAML under pipelines/
(`dg scaffold defs llm_assets.LLMPipelineComponent NAME`).
"""

import warnings
from pathlib import Path

import dagster as dg

from llm_assets.defs.component import load_yaml_pipelines
from llm_assets.defs.factory import build_definitions
from llm_assets.demo import demo_pipeline
from llm_assets.demo.embed import embed_pipeline
from resources import default_resources

PROJECT_DIR = Path(__file__).resolve().parent

PYTHON_PIPELINES = [demo_pipeline(), embed_pipeline()]

# The YAML pipelines: pipelines/*/defs.yaml, loaded (and checked) once here. Dagster's component
# loader calls its own preview/beta APIs; their warnings would be printed at every load.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.PreviewWarning)
    warnings.simplefilter("ignore", dg.BetaWarning)
    YAML_TREE, YAML_PIPELINES = load_yaml_pipelines(PROJECT_DIR)
    # The resources are defined once, here, for the pipelines of both kinds (one Definitions
    # object at module scope: Dagster refuses a module with two).
    defs = dg.Definitions.merge(
        build_definitions(PYTHON_PIPELINES, resources=default_resources(PROJECT_DIR / ".llm_assets")),
        YAML_TREE.build_defs(),
    )

# Every pipeline, for `python -m llm_assets.cli add-partitions`.
PIPELINES = PYTHON_PIPELINES + YAML_PIPELINES
