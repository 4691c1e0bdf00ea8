"""mergekit_run reads mergekit 0.1.5's own objects off the call stack: check each one
during a real merge, so that a mergekit release that moves them fails here first;
and a moved name is reported loudly, naming it."""

import pytest
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from conftest import recipe
from mergekit_awd import context, mergekit_run
from mergekit_awd.method import AWDMerge


def test_running_merge_is_visible_to_the_kernel(family, tmp_path, monkeypatch):
    seen = []
    real = AWDMerge.merge_group

    def probe(self, group, /, **p):
        run = context.current()
        if run.recorder() is None:  # not the Gram pass's own executor
            executor = mergekit_run.current_executor()
            seen.append((group.metadata.name, executor, mergekit_run.current_inputs(),
                         mergekit_run.run_merge_call(executor.universe), run))
        return real(self, group, **p)

    monkeypatch.setattr(AWDMerge, "merge_group", probe)
    out = tmp_path / "out"
    options = MergeOptions(copy_tokenizer=False, quiet=True)
    config = MergeConfiguration.model_validate(recipe(family["base"], family["fts"], steps=5))
    run_merge(config, str(out), options)
    assert seen
    names, runs = set(), set()
    models = {str(m) for m in config.referenced_models()}
    for name, executor, inputs, call, run in seen:
        assert any(getattr(t, "output_weight", None) is not None
                   and t.output_weight.name == name for t in executor.universe.tasks)
        assert {str(m) for m in inputs} == models
        names.add(name)
        assert call.out_path == str(out) and call.options is options and call.config is config
        assert run.out_path == str(out) and run.quiet is True
        runs.add(id(run))
    assert "model.layers.0.mlp.up_proj.weight" in names
    assert len(runs) == 1  # one context for the whole merge
    run = seen[0][-1]
    assert run.planned > 0 and next(run._merged) == run.planned + 1  # each counted once


def test_nothing_is_found_outside_a_merge():
    assert mergekit_run.current_inputs() is None
    assert mergekit_run.current_executor() is None
    assert mergekit_run.run_merge_call() is None
    assert context.current() is None


def test_a_moved_mergekit_name_fails_loudly(monkeypatch):
    from mergekit import merge

    def run_merge(merge_config, out_path, options, config_source=None):  # no 'exec'
        executor = None
        return executor

    monkeypatch.setattr(merge, "run_merge", run_merge)
    monkeypatch.setattr(mergekit_run, "_CHECKED", False)
    with pytest.raises(mergekit_run.MergekitMoved,
                       match=r"mergekit.merge.run_merge: local 'exec'.*mergekit-awd merge"):
        mergekit_run.check()
