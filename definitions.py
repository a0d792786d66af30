"""The Dagster code location: `dagster dev -w workspace.yaml` or `dagster job execute -f definitions.py`.

With no settings it holds the demo pipeline (SmolLM2 on the bundled prompts), an embedding
pipeline (all-MiniLM-L6-v2 on bundled sentences), local Ray, and outputs under
./.llm_assets/storage. Add your own pipelines to PIPELINES.
"""

from pathlib import Path

from llm_assets.demo import demo_pipeline
from llm_assets.demo.embed import embed_pipeline
from llm_assets.defs.factory import build_definitions
from resources import default_resources

PROJECT_DIR = Path(__file__).resolve().parent

PIPELINES = [demo_pipeline(), embed_pipeline()]

defs = build_definitions(PIPELINES, resources=default_resources(PROJECT_DIR / ".llm_assets"))
