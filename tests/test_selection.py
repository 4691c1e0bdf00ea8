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
