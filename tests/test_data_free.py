"""tsv, iso_c, iso_cts, wudi and their AWD variants against naive float64 references."""

import pytest
import torch
from mergekit.merge_methods import TensorGroup, get

import families
import mergekit_awd  # noqa: F401  (registers the methods)
import reference
import reference_data_free as naive
from conftest import mergekit_yaml
from mergekit_awd import data_free, spectral

RULES = ("tsv", "iso_c", "iso_cts", "wudi")
NAME = "model.layers.0.mlp.up_proj.weight"


def _taus(T, shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=g, dtype=torch.float64)
    return [scale * (0.5 * shared + torch.randn(shape, generator=g, dtype=torch.float64))
            for _ in range(T)]


def _rule(method, taus, **knobs):
    s = mergekit_awd.params.Settings(**{
        "common_space_fraction": knobs.get("common_space_fraction", 0.8),
        "wudi_steps": knobs.get("wudi_steps", 300), "wudi_lr": knobs.get("wudi_lr", 1e-5)})
    return spectral.merged(method, torch.stack(taus), **data_free.knobs(method, s))


def _close(got, want, rel=1e-9):
    err = float((got - want).norm() / want.norm())
    assert err < rel, err


# shapes: tall, wide, k not divisible by T (FusionBench's int(k * (1/T)) and Iso-CTS's
# rounding), T = 2..4
@pytest.mark.parametrize("method", ("tsv", "iso_c", "iso_cts"))
@pytest.mark.parametrize("T, shape", [(3, (24, 16)), (2, (10, 31)), (4, (30, 30)), (3, (7, 40))])
def test_svd_rules_match_the_naive_reference(method, T, shape):
    taus = _taus(T, shape)
    _close(_rule(method, taus), naive.rule(method, taus, {}))


@pytest.mark.parametrize("fraction", (0.1, 0.5, 1.0))
def test_iso_cts_fraction(fraction):
    taus = _taus(3, (20, 14), seed=1)
    _close(_rule("iso_cts", taus, common_space_fraction=fraction),
           naive.iso_cts(taus, fraction))


def test_iso_cts_common_size_never_negative():
    """fraction 0, k 14, T 3: the reference's rounding asks for -1 common directions
    (and fails); here none, and 4 per task."""
    assert spectral.common_size(14, 3, 0.0) == 0
    taus = _taus(3, (20, 14), seed=1)
    with pytest.raises(RuntimeError):
        naive.iso_cts(taus, 0.0)
    assert torch.isfinite(_rule("iso_cts", taus, common_space_fraction=0.0)).all()


# the square (A) form and the low-rank (C) form of x A: n <= 2 T m and n > 2 T m
@pytest.mark.parametrize("T, shape", [(3, (12, 20)), (2, (3, 40)), (4, (40, 6))])
def test_wudi_matches_autograd_through_the_products(T, shape):
    taus = _taus(T, shape, seed=2, scale=1e-3)
    knobs = dict(wudi_steps=60, wudi_lr=1e-5)
    got = _rule("wudi", taus, **knobs)
    _close(got, naive.wudi(taus, 60, 1e-5))
    assert float((got - sum(taus)).norm()) > 1e-3 * float(sum(taus).norm())  # it moved


def test_wudi_forms_its_terms_through_the_smaller_side():
    """A tall matrix (an embedding: m = vocabulary >> n): B = sum_i tau_i tau_i^T tau_i / n_i
    through an n x n product, never an m x m one (9.7 GB for SmolLM2's 49152 x 576, 66 GB
    for Llama 3's 128256 x 2048), and A likewise: O(T m n^2) flops in all. Wide: m n^2
    would be the larger, so the m x m side is the cheap one there."""
    from torch.utils.flop_counter import FlopCounterMode

    for shape, bound in (((3000, 6), 3 * 3000 * 6 * 6), ((6, 3000), 3 * 3000 * 6 * 6)):
        taus = torch.stack(_taus(3, shape, seed=5, scale=1e-3))
        with FlopCounterMode(display=False) as counter:
            apply, B = spectral.wudi_terms(taus)
            apply(B)
        assert counter.get_total_flops() <= 10 * bound, (shape, counter.get_total_flops())
        want = sum(t @ t.T @ t / t.square().sum() for t in taus)
        _close(B, want)


def test_null_directions_carry_nothing():
    """A task vector that is zero on a tensor (a frozen embedding) has no directions:
    TSV-M gives the other tasks' merge with the same r, WUDI the merge without it
    (the reference's 0/0 is NaN), Iso-C a rank-deficient sum keeps its own span."""
    a, b = _taus(2, (18, 12), seed=3, scale=1e-3)
    zero = torch.zeros_like(a)
    _close(_rule("tsv", [a, b, zero]), naive.tsv_m([a, b], r=int(12 * (1 / 3))))
    _close(_rule("wudi", [a, b, zero], wudi_steps=30), naive.wudi([a, b], 30))
    assert torch.isnan(naive.wudi([a, b, zero], 2)).all()
    low = [torch.outer(x[:, 0], x[0]) for x in (a, b)]  # rank 1 each: the sum has rank 2
    merged = _rule("iso_c", low)
    assert torch.linalg.matrix_rank(merged) == 2
    u = torch.linalg.svd(sum(low), full_matrices=False)[0][:, :2]
    _close(u @ (u.T @ merged), merged)  # in the sum's column space
    for method in RULES:
        assert torch.isfinite(_rule(method, [a, zero, zero])).all()


def test_kernel_weights_lambda_and_the_rest_averaged():
    """base + lambda * RULE(weight_i tau_i) for a matrix; a 1-D tensor and an excluded
    matrix: base + lambda * mean(weight_i tau_i); a 3-D tensor: each slice."""
    g = torch.Generator().manual_seed(4)
    for shape, name, exclude, is_rule in [
            ((16, 12), NAME, "none", True),
            ((16,), "model.layers.0.input_layernorm.weight", "none", False),
            ((16, 12), NAME, "up_proj", False),
            ((16, 12), "model.embed_tokens.weight", "vocabulary", False),
            ((3, 8, 6), "model.layers.0.mlp.experts.gate_up_proj", "none", True)]:
        base = torch.randn(shape, generator=g, dtype=torch.float64)
        fts = [base + 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)
               for _ in range(3)]
        vocab = 0 if "embed" in name else None
        group = TensorGroup.from_tensors([base, *fts], ids=["b", "x", "y", "z"],
                                         base_index=0, name=name, vocabulary_axis=vocab)
        for method in ("tsv", "iso_cts"):
            p = {"lambda": 0.7, "weight": {"x": 1.0, "y": 0.5, "z": 2.0}, "exclude": exclude}
            (got,) = get(method)([group], parameters=p)
            want = naive.merge_tensor(method, base, fts, {"lambda": 0.7}, [1.0, 0.5, 2.0],
                                      excluded=not is_rule)
            _close(got, want, 1e-12)


# -- whole models through mergekit ------------------------------------------------------


def _check_model(merged, want, base, rel=1e-5, float32=None):
    """Each merged tensor is the float64 reference's to ``rel`` of its move from the
    base, plus one float32 unit of the result, plus 3x what the same naive algorithm
    loses in float32 (``float32``: its merge computed so): an SVD's truncation at rank
    r amplifies float32 rounding by s_1 / (s_r - s_r+1), so TSV-M's float32 error on
    the embedding is 1.5x the first two terms with torch's portable kernels (0.9x
    with AVX2); the naive float32 run's own error was 0.8-1.2x the merge's."""
    assert set(merged) == set(want)
    for name, tensor in merged.items():
        moved = float((want[name] - base[name].double()).norm())
        err = float((tensor.double() - want[name]).norm())
        own = 0.0 if float32 is None else float((float32[name] - want[name]).norm())
        bound = rel * moved + 2.0 ** -23 * float(want[name].norm()) + 3 * own
        assert err <= bound, (name, err, moved, own)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return families.make(str(tmp_path_factory.mktemp("llama")), "llama", n_models=3)


@pytest.mark.parametrize("method", RULES)
def test_mergekit_yaml_equals_the_naive_merge(llama, tmp_path, method):
    """Every tensor of a tiny Llama (embeddings, head and norms included) is the
    reference's; WUDI at a step size that keeps float32 and float64 Adam together
    (its published 1e-5 is 2-25x these task vectors' entries: it would oscillate)."""
    params = {"lambda": 0.9}
    if method == "wudi":
        params.update(wudi_steps=50, wudi_lr=1e-7)
    config = {"merge_method": method, "base_model": llama["base"], "dtype": "float32",
              "models": [{"model": p} for p in llama["fts"]], "parameters": params}
    mergekit_yaml(config, tmp_path / "out")
    want, base = naive.merge(method, llama["base"], llama["fts"], params)
    float32, _ = naive.merge(method, llama["base"], llama["fts"], params, dtype=torch.float32)
    _check_model(reference.load(str(tmp_path / "out")), want, base, float32=float32)


@pytest.mark.parametrize("family, method", [("qwen3-moe", "tsv"), ("qwen2-tied", "iso_c"),
                                            ("gpt2", "iso_cts"), ("mixtral", "wudi")])
def test_run_merge_on_other_families(tmp_path, family, method):
    """Fused 3-D experts (each expert's matrix), tied embeddings, GPT-2's Conv1D layout
    (the stored matrix), Mixtral's per-expert matrices; ``exclude: vocabulary`` averages
    what mergekit's architecture gives a vocabulary axis."""
    from conformance import load_state, run_merge_in_process

    paths = families.make(str(tmp_path / "models"), family, n_models=3)
    params = {"lambda": 0.8, "exclude": "vocabulary"}
    if method == "wudi":
        params.update(wudi_steps=20, wudi_lr=1e-7)
    config = {"merge_method": method, "base_model": paths["base"],
              "models": [{"model": p} for p in paths["fts"]], "parameters": params}
    assert run_merge_in_process(config, str(tmp_path / "out")) is None
    merged = reference.load(str(tmp_path / "out"))
    vocab = {n for n in merged if "wte" in n or "embed" in n or "lm_head" in n}
    assert vocab
    def naive_in(dtype):
        return naive.merge(method, paths["base"], paths["fts"], params,
                           excluded=lambda n: n in vocab, dtype=dtype,
                           load=lambda p: load_state(p, family, torch.float32))

    want, base = naive_in(torch.float64)
    float32, _ = naive_in(torch.float32)
    assert any(t.ndim == 3 for t in base.values()) == (family in ("qwen3-moe", "mixtral"))
    _check_model(merged, want, base, float32=float32)


@pytest.mark.parametrize("method", ("awd_tsv", "awd_iso_cts", "awd_wudi"))
def test_awd_variant_is_the_rule_of_the_disentangled_vectors(method):
    """awd_RULE: base + lambda * RULE(tau_i - delta) + keep_delta * delta, delta the
    naive full-space solve (scope: tensor)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(20, 14, generator=g, dtype=torch.float64)
    shared = torch.randn(20, 14, generator=g, dtype=torch.float64)
    fts = [base + 0.02 * shared + 0.01 * torch.randn(20, 14, generator=g, dtype=torch.float64)
           for _ in range(3)]
    group = TensorGroup.from_tensors([base, *fts], ids=["b", "x", "y", "z"], base_index=0,
                                     name=NAME)
    rule = method[len("awd_"):]
    own = {"wudi_steps": 40, "wudi_lr": 1e-4} if rule == "wudi" else {}
    p = {"scope": "tensor", "steps": 200, "alpha": 0.01, "keep_delta": 0.5, "lambda": 0.8,
         **own}
    (got,) = get(method)([group], parameters=p)
    taus = torch.stack([f - base for f in fts])
    delta = reference.solve_delta(taus.reshape(3, -1), 0.01, 0.005, 200).reshape(base.shape)
    want = base + 0.8 * naive.rule(rule, list(taus - delta), p) + 0.5 * delta
    _close(got, want, 1e-8)
    (plain,) = get(rule)([group], parameters={"lambda": 0.8, **own})
    assert float((got - plain).norm()) > 1e-3 * float((plain - base).norm())


# -- bad knobs ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, params, needle", [
    ("iso_cts", {"common_space_fraction": 1.5},
     "iso_cts parameter 'common_space_fraction' must be a number in [0, 1]; got 1.5"),
    ("wudi", {"wudi_steps": -1}, "wudi parameter 'wudi_steps' must be an integer >= 0; got -1"),
    ("wudi", {"wudi_lr": 0}, "wudi parameter 'wudi_lr' must be a finite number > 0; got 0"),
    ("tsv", {"exclude": "("}, "tsv parameter 'exclude' must be 'none', 'vocabulary' or a "
                              "valid regular expression on tensor names; got '('"),
    ("tsv", {"alpha": 0.01}, "tsv has no parameter 'alpha'"),
    ("iso_c", {"common_space_fraction": 0.5}, "iso_c has no parameter 'common_space_fraction'"),
    ("awd_tsv", {"normalize": True}, "awd_tsv has no parameter 'normalize'"),
])
def test_bad_knob_is_one_line_at_planning(llama, tmp_path, method, params, needle):
    config = {"merge_method": method, "base_model": llama["base"],
              "models": [{"model": p} for p in llama["fts"]], "parameters": params}
    proc = mergekit_yaml(config, tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Executing graph" not in proc.stderr


def test_spectral_rank_cut_and_polar():
    assert spectral.rank_cut(torch.tensor([2.0, 1e-3, 0.0]), (4, 3)) == 2
    assert spectral.rank_cut(torch.zeros(3), (4, 3)) == 0
    q = spectral.polar(torch.randn(9, 4, dtype=torch.float64))
    _close(q.T @ q, torch.eye(4, dtype=torch.float64), 1e-12)


def test_nan_in_an_input_is_refused_and_an_agreed_mask_kept():
    """NaN in one fine-tune is refused naming it; -inf where every input has it (a
    mask buffer) stays, the rest is merged."""
    from mergekit_awd.params import AWDInputError

    g = torch.Generator().manual_seed(6)
    base = torch.randn(12, 10, generator=g)
    fts = [base + 0.01 * torch.randn(12, 10, generator=g) for _ in range(3)]
    bad = [f.clone() for f in fts]
    bad[1][2, 3] = float("nan")
    group = TensorGroup.from_tensors([base, *bad], ids=["b", "x", "y", "z"], base_index=0,
                                     name=NAME)
    with pytest.raises(AWDInputError, match=r"contains NaN or Inf in model y\b"):
        get("iso_c")([group], parameters={})
    masked = [t.clone() for t in (base, *fts)]
    for t in masked:
        t[0, 0] = float("-inf")
    group = TensorGroup.from_tensors(masked, ids=["b", "x", "y", "z"], base_index=0, name=NAME)
    (got,) = get("iso_c")([group], parameters={})
    assert got[0, 0] == float("-inf") and torch.isfinite(got.flatten()[1:]).all()
    taus = [(f - base).double() for f in fts]
    for t in taus:
        t[0, 0] = 0.0
    want = base.double() + naive.iso_c(taus)
    want[0, 0] = 0.0
    got = got.double()
    got[0, 0] = 0.0
    _close(got, want, 1e-5)


def test_an_svd_that_fails_in_float32_is_done_in_float64(monkeypatch):
    """gesdd can fail to converge in float32 (Iso-CTS's polar step on SmolLM2): the rule
    then takes that SVD in float64 and still equals the reference."""
    real = torch.linalg.svd

    def flaky(x, *args, **kwargs):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    taus = _taus(3, (20, 14), seed=7)
    got = spectral.iso_cts(torch.stack(taus).float(), 0.8)
    assert got.dtype == torch.float32
    _close(got.double(), naive.iso_cts(taus, 0.8), 1e-5)


# -- progress on long tensors ------------------------------------------------------------


def test_rules_tell_their_progress_and_it_changes_nothing():
    """Each long step says its share of the tensor's work, rising inside (0, 1): WUDI per
    step, TSV-M and Iso-CTS per SVD, a stack of experts per expert and within each; the
    merged tensor is the same bits with or without a listener."""
    taus = torch.stack(_taus(3, (12, 9), seed=3, scale=1e-3)).float()
    cases = {"wudi": (dict(steps=8, lr=1e-5), 7), "tsv": ({}, 3),
             "iso_cts": (dict(fraction=0.5), 4), "iso_c": ({}, 0)}
    for rule, (knobs, calls) in cases.items():
        said = []
        got = spectral.merged(rule, taus.clone(), said.append, **knobs)
        assert torch.equal(got, spectral.merged(rule, taus.clone(), **knobs)), rule
        assert len(said) == calls, (rule, said)
        assert said == sorted(said) and all(0 < f < 1 for f in said), (rule, said)
    said = []
    stack = torch.stack([taus, 2 * taus], dim=1)  # T x E x m x n, E = 2 experts
    spectral.merged("wudi", stack, said.append, steps=4, lr=1e-5)
    assert said == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875], said


def test_tensor_progress_speaks_only_on_long_tensors():
    """Silent for its first 30 s, then one line a minute: share done, time left at the
    rate since the first step (10 s of set-up before it do not count)."""
    now, lines = [100.0], []
    progress = data_free.TensorProgress("wudi: embed (49152 x 576)", lines.append,
                                        clock=lambda: now[0])
    for t, f in ((110, 0.1), (129, 0.2), (130, 0.25), (150, 0.3), (190, 0.5), (4000, 0.9)):
        now[0] = t
        progress(f)
    assert lines == ["wudi: embed (49152 x 576): 25% done after 30 s, about 1 min 40 s left",
                     "wudi: embed (49152 x 576): 50% done after 1 min 30 s, "
                     "about 1 min 40 s left",
                     "wudi: embed (49152 x 576): 90% done after 1 h 5 min, about 8 min 6 s left"]


@pytest.fixture
def eager_progress(monkeypatch):
    """Every tensor counts as long: a progress line at every step."""
    class Eager(data_free.TensorProgress):
        def __init__(self, what, write):
            super().__init__(what, write, after=0.0, every=0.0)

    monkeypatch.setattr(data_free, "TensorProgress", Eager)


@pytest.mark.parametrize("quiet", (False, True))
def test_a_merge_shows_a_long_tensor_s_progress_unless_quiet(llama, tmp_path, eager_progress,
                                                             capsys, quiet):
    """Through mergekit's run_merge: a line per tensor on stderr, named, with its shape
    (here every tensor counts as long); none under --quiet."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = {"merge_method": "wudi", "base_model": llama["base"], "dtype": "float32",
              "models": [{"model": p} for p in llama["fts"]],
              "parameters": {"wudi_steps": 3, "wudi_lr": 1e-7}}
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "out"),
              MergeOptions(copy_tokenizer=False, quiet=quiet))
    err = capsys.readouterr().err
    line = "wudi: model.layers.0.mlp.down_proj.weight ("
    if quiet:
        assert "% done after" not in err, err[-2000:]
    else:
        assert line in err and "33% done after 0 s, about 0 s left" in err, err[-2000:]
        assert "67% done after" in err


@pytest.mark.parametrize("quiet", (False, True))
def test_tune_forms_a_rule_as_quietly_as_it_was_asked(llama, eager_progress, capsys, quiet):
    """tune's own forming (not run_merge) says the progress too, and not under --quiet."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_awd import tune

    config = MergeConfiguration.model_validate(
        {"merge_method": "wudi", "base_model": llama["base"], "dtype": "float32",
         "models": [{"model": p} for p in llama["fts"]],
         "parameters": {"wudi_steps": 3, "wudi_lr": 1e-7}})
    former = tune.Former(config, MergeOptions(quiet=quiet), 2**40,
                         tune.load_model(llama["base"]), in_memory=True)
    candidate = tune.Candidate("wudi", (("lambda", 1.0),))
    former.prepare([candidate])
    capsys.readouterr()
    assert former.form(candidate)
    err = capsys.readouterr().err
    assert ("wudi: model.layers.0.mlp.down_proj.weight (" in err) != quiet, err[-2000:]
