"""What the Ray tasks of a run get for each stage: the stage's UDF, its kwargs (with the local
folder of a model the stage loads: an ``s3://`` model is downloaded once, before the run starts),
its batch size and where its output of a partition goes."""

from __future__ import annotations

from llm_assets.execution.commits import Commits
from llm_assets.execution.inputs import Unit
from llm_assets.execution.steps import Group
from llm_assets.execution.units import StageCall
from llm_assets.models import resolve_model_source
from llm_assets.tasks import ENGINE


class StageCalls:
    def __init__(self, pipeline, chain: list[str], commits: Commits, model_s3, log):
        self.pipeline, self.chain, self.commits = pipeline, chain, commits
        sources = {pipeline.plan(stage).model_source for stage in chain} - {None}
        self.models = {source: resolve_model_source(source, log, model_s3) for source in sources}

    def udf_kwargs(self, plan) -> dict:
        kwargs = dict(plan.udf_kwargs)
        if plan.model_source:
            kwargs["model_source"] = self.models[plan.model_source]
        return kwargs

    def for_unit(self, group: Group, unit: Unit) -> list[StageCall]:
        """The group's stages this unit still goes through, each with where it writes the unit."""
        calls = []
        for stage in group.stages:
            if self.chain.index(stage) < unit.entry or (stage == ENGINE and unit.after_engine):
                continue
            plan = self.pipeline.plan(stage)
            batch_size = plan.settings.batch_size or self.pipeline.config.batch_size
            counted = self.pipeline.engine.count_columns if stage == ENGINE else {}
            calls.append(
                StageCall(
                    stage,
                    plan.udf,
                    self.udf_kwargs(plan),
                    batch_size,
                    *self.commits.target(stage, unit.partition),
                    counted,
                )
            )
        return calls

    def stages(self, group: Group) -> list[tuple[type, dict]]:
        """The group's stages that build something (a UDF), with their kwargs: what a warm-up builds."""
        plans = map(self.pipeline.plan, group.stages)
        return [(plan.udf, self.udf_kwargs(plan)) for plan in plans if plan.udf is not None]

    def check_before_run(self) -> None:
        """Each stage's own setup check (a model without a chat template, say), in the driver
        before any task or engine starts."""
        for stage in self.chain:
            plan = self.pipeline.plan(stage)
            check = getattr(plan.udf, "check_before_run", None)
            if check is not None:
                check(**self.udf_kwargs(plan))
