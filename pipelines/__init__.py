"""Pipelines declared in YAML: one folder per pipeline, holding its defs.yaml (an
llm_assets.LLMPipelineComponent) and the row functions it names.

`dg scaffold defs llm_assets.LLMPipelineComponent NAME` adds one; definitions.py loads them all.
"""
