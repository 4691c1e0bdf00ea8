"""running.py reads mergekit 0.1.5's own objects off the call stack: check each one
during a real merge, so that a mergekit release that moves them fails here first."""

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

from conftest import recipe
from mergekit_awd import running, scope
from mergekit_awd.method import AWDMerge


def test_running_merge_is_visible_to_the_kernel(family, tmp_path, monkeypatch):
    seen = []
    real = AWDMerge.merge_aligned

    def probe(self, group, p, state):
        task, executor = running.current_task(), running.current_executor()
        if scope.COLLECTING.get() is None:  # not the Gram pass's own executor
            seen.append((group.metadata.name, task, executor,
                         running.run_merge(executor.universe)))
        return real(self, group, p, state)

    monkeypatch.setattr(AWDMerge, "merge_aligned", probe)
    out = tmp_path / "out"
    options = MergeOptions(copy_tokenizer=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(recipe(family["base"], family["fts"], steps=5)),
              str(out), options)
    assert seen
    names = set()
    for name, task, executor, run in seen:
        assert task.output_weight.name == name
        assert executor.universe.get_handle(task) is not None
        names.add(name)
        assert run is not None and run.out_path == str(out) and run.options is options
        assert run.quiet is True and run.config.merge_method == "awd"
        assert run.executor() is not None  # run_merge's own executor, alive during the merge
    assert "model.layers.0.mlp.up_proj.weight" in names


def test_nothing_is_found_outside_a_merge():
    assert running.current_task() is None
    assert running.current_executor() is None
    assert running.run_merge() is None
