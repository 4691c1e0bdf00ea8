"""Which tensors `select: linear` takes: mergekit's architecture, or the name convention."""

import pytest

from mergekit_awd import selection


def test_unreadable_config_is_an_error_not_a_silent_fallback(tmp_path):
    """A broken config.json used to fall back to the naming convention without a word
    (and stay cached for the life of the process)."""
    from mergekit.common import ModelReference

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    ref = ModelReference.model_validate(str(folder))
    for _ in range(2):  # not cached either
        with pytest.raises(Exception) as info:
            selection.layer_weight_names(ref)
        assert "json" in str(info.value).lower() or "config" in str(info.value).lower()


def test_in_memory_ids_use_the_name_convention(family):
    from mergekit.common import ModelReference

    assert selection.layer_weight_names("base") is None
    assert selection.layer_weight_names(0) is None
    names = selection.layer_weight_names(ModelReference.model_validate(family["base"]))
    assert "model.layers.0.mlp.up_proj.weight" in names
    assert "model.embed_tokens.weight" not in names


def test_multi_gpu_worker_threads_read_the_merge_s_trust_remote_code(family):
    """mergekit keeps trust_remote_code per thread (LoaderCache): a --multi-gpu worker
    thread sees the default (False); the kernel passes its merge's own option."""
    import threading
    from types import SimpleNamespace

    import torch
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge_methods.base import TensorEntry, TensorGroup, TensorMetadata

    from mergekit_awd import context
    from mergekit_awd.method import AWDMerge

    real = ModelReference.model_validate(family["base"])
    seen = []

    class Recording:  # a model reference that records how its config is read
        def __hash__(self):
            return 7

        def config(self, trust_remote_code=False):
            seen.append(trust_remote_code)
            return real.config(trust_remote_code=False)

    base = Recording()
    group = TensorGroup(entries=(
        TensorEntry(id=base, tensor=torch.zeros(4, 4), is_base=True),
        TensorEntry(id="ft", tensor=torch.ones(4, 4), is_base=False)),
        metadata=TensorMetadata(name="model.layers.0.mlp.up_proj.weight"))
    run = context.RunContext(options=SimpleNamespace(trust_remote_code=True, quiet=True))
    p = {d.name: ({"ft": None} if d.per_model else None) for d in AWDMerge().declared}

    def worker():
        assert LoaderCache().trust_remote_code is False  # this thread's default
        AWDMerge().settings(group, p, run)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [True]
