"""The Gram pass reads its tensors in the reverse of the merge's order, so the page
cache still holds what the merge reads first."""

from conftest import recipe
from mergekit_awd import context, mergekit_run, scope


def planned(family, **parameters):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions

    config = MergeConfiguration.model_validate(
        recipe(family["base"], family["fts"], **parameters))
    options = MergeOptions(copy_tokenizer=False, quiet=True)
    return config, options, mergekit_run.plan_tensor_tasks(config, options)


def test_gram_pass_reads_in_the_reverse_of_the_merge_order(family, tmp_path, monkeypatch):
    from mergekit_awd import combination

    config, options, tasks = planned(family, scope="global", select=".*")
    run = context.RunContext(config=config, options=options)
    collected = scope.collect_tasks(run, "awd", tasks, "cpu", "cpu")
    names = [t.name for t in collected.tensors]
    assert len(names) == len(tasks) > 5
    # the order mergekit's executor hands the merge's tensors to the kernel
    merged, merge = [], combination.disentangled  # every tensor is selected
    monkeypatch.setattr(combination, "disentangled", lambda c, d, group, *a: (
        merged.append(group.metadata.name), merge(c, d, group, *a))[1])
    context.run_merge(config, str(tmp_path / "out"), options)
    assert names == merged[::-1]
