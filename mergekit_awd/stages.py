"""`mergekit-awd tune` as a pipeline of named stages, with typed data between them:

    check -> plan -> inputs -> search -> compare -> write (static) -> learn -> test -> write

- *plan* (``Plan``): the methods, the knob values, the λ search's budget;
- *inputs* (``Inputs``): tokenizer, tasks, the metric, the scorer, the loaded model and
  the ``tune.Former`` that forms candidates (one Gram pass for every AWD candidate);
- *search* (``Search``): every candidate scored, in order; each scored row is appended
  to the run's record (``record.Record``) as it finishes, and a run started again on
  the same ``--out`` reuses the rows already recorded;
- *compare* (``Result``): the choice and its intervals against each rival;
- *write*: ``tune.json``, ``best.yml`` and the picture, as soon as the static stage
  ends and again after each learned method, so that no later error loses them;
- *learn*: one learned merge per learnable method; a method that fails is a row with
  its error, and the run goes on;
- *test*: the chosen merge, the learned ones and the rivals scored once on ``--test``.

``cli.py`` only turns the command line into a ``Request`` and prints ``Result``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from mergekit_awd import context, evaluate, params, tune
from mergekit_awd import keep as keep_mod
from mergekit_awd import learn as learn_mod
from mergekit_awd.record import Record


class TuneError(Exception):
    """A refusal of the whole run, in one line (the CLI shows it as an error)."""


class UsageProblem(TuneError):
    """A refusal caused by the command line or the recipe."""


@dataclass
class Request:
    """What the user asked for (the command line, parsed)."""

    config: object
    options: object
    data: tuple
    test: tuple
    methods: Optional[str]
    knobs: Dict[str, Optional[str]]
    metric: Optional[str]
    eval_cmd: Optional[str]
    out_dir: str
    merge_to: Optional[str] = None
    max_memory: Optional[float] = None
    batch_tokens: int = 4096
    learning: Optional[learn_mod.Learning] = None
    max_new_tokens: int = 64
    budget: Optional[int] = None
    restart: bool = False
    knob_values: Callable = None  # (ParameterSpec, given, config) -> values
    keep: tuple = ()  # --keep files
    keep_model: Optional[str] = None
    keep_weight: Optional[float] = None


@dataclass
class Plan:
    methods: List[str]
    values: Dict[str, list]
    searched: bool  # no --lambda: λ is searched, else an exact grid
    steps: list  # [(method, settings, evaluations per setting or None)]
    left_out: Dict[str, str]


@dataclass
class Inputs:
    tasks: list
    test_tasks: list
    metric: str  # what chooses: exact, loss, entropy or external
    scorer: evaluate.Scorer
    model: object  # the model that scores in-process, or None
    former: tune.Former
    device: str
    remote: bool
    decide_tasks: list = field(default_factory=list)  # --learn: learned vs static
    keep: Optional[keep_mod.Keep] = None  # --keep: what the merge must go on doing


@dataclass
class Scored:
    """One candidate formed and scored."""

    scores: Dict
    means: Dict[str, float]
    form_seconds: float
    score_seconds: float
    keep: Optional[dict] = None  # its keep loss (keep.Keep.scores), where asked


@dataclass
class Search:
    rows: list = field(default_factory=list)
    candidates: list = field(default_factory=list)  # rows[i] is candidates[i]'s
    searches: list = field(default_factory=list)
    interrupted: bool = False
    reused: int = 0


@dataclass
class Result:
    data: dict  # what tune.json holds
    best: int  # the chosen static row
    rivals: Dict[int, str]
    learned: list = field(default_factory=list)  # learn.Learned entries that finished
    chosen_label: str = ""
    chosen_tensors: Optional[dict] = None
    best_cfg: object = None


# -- check and plan ------------------------------------------------------------------


def check(req: Request) -> None:
    """Refuse what cannot be tuned, before anything is loaded."""
    config = req.config
    if config.base_model is None:
        raise UsageProblem("tune compares task-vector merges: the recipe needs base_model")
    if config.tokenizer_source is not None or config.tokenizer is not None:
        raise UsageProblem("tune scores with the base model's tokenizer: remove "
                           "tokenizer_source/tokenizer from the recipe to tune it")
    if config.base_model.lora is not None:
        raise UsageProblem("tune loads base_model as the model to score: give it "
                           "without a LoRA adapter")
    keep_mod.check(req.keep, req.keep_model, req.keep_weight, req.eval_cmd)
    if req.eval_cmd and req.test:
        raise UsageProblem("--test is scored by the built-in scorer; with --eval-cmd, "
                           "run your evaluator on the merge of best.yml (--merge-to)")
    if req.learning is not None:
        req.learning.check()
        if req.eval_cmd:
            raise UsageProblem("--learn fits and stops on the built-in scores; it "
                               "cannot be combined with --eval-cmd")
        if config.slices or config.modules:
            raise UsageProblem("--learn writes per-model weights into a 'models:' "
                               "recipe; this recipe has slices/modules")


def plan(req: Request) -> Plan:
    config, recipe_method = req.config, req.config.merge_method
    if req.methods:
        methods = [m.strip() for m in req.methods.split(",") if m.strip()]
    elif req.learning is not None:
        methods = list(dict.fromkeys(
            [m for m in (recipe_method, "task_arithmetic") if m in learn_mod.LEARNABLE]))
    else:
        methods = list(dict.fromkeys([recipe_method, *tune.DEFAULT_METHODS]))
    if req.learning is not None:
        learn_mod.refuse_unlearnable(methods, config)
    values = {p.name: req.knob_values(p, req.knobs[p.name], config) for p in params.TUNABLE}
    searched = req.knobs["lambda"] is None
    steps = tune.plan(methods, values, searched, req.budget)
    left_out = tune.check_methods(config, methods, req.options, given=bool(req.methods))
    if not req.methods:
        left_out.update(tune.costly(config, [m for m in methods if m not in left_out
                                             and m != recipe_method], req.options))
    return Plan([m for m in methods if m not in left_out], values, searched,
                [s for s in steps if s[0] not in left_out], left_out)


# -- inputs --------------------------------------------------------------------------


def inputs(req: Request, the_plan: Plan, say) -> Inputs:
    """Tokenizer, tasks, metric, scorer, model and former; memory checked for --learn."""
    from transformers import AutoTokenizer

    config, options, learning = req.config, req.options, req.learning
    base_path = str(config.base_model.model.path)
    remote = bool(getattr(options, "trust_remote_code", False))
    revision = config.base_model.model.revision
    tokenizer = AutoTokenizer.from_pretrained(base_path, revision=revision,
                                              trust_remote_code=remote)
    # prompts alone only where entropy was asked for, or where --learn's objective is
    # not given (it becomes entropy then); elsewhere a missing completion is a mistake
    prompts_only = req.metric == "entropy" or (
        learning is not None and learning.objective in (None, "entropy"))
    tasks = evaluate.load_tasks(req.data, tokenizer, base_path,
                                need_answers=not prompts_only)
    complete = all(a is not None for t in tasks for _, a in t.examples)
    metric = req.metric or ("exact" if complete else "entropy")
    if metric != "entropy" and not complete:
        where = next(t.path for t in tasks if any(a is None for _, a in t.examples))
        raise evaluate.AWDDataError(
            f"{where}: some examples have no completion, which --metric {metric} needs; "
            f"give --metric entropy to score prompts alone")
    if learning is not None:
        if learning.objective == "loss" and not complete:
            where = next(t.path for t in tasks if any(a is None for _, a in t.examples))
            raise evaluate.AWDDataError(
                f"{where}: some examples have no completion, which --objective loss "
                f"needs; give --objective entropy (or leave it out) to learn from "
                f"prompts alone")
        learning.objective = learning.objective or ("loss" if complete else "entropy")
        tasks, decide_tasks = set_aside(tasks, learning.decide, options.random_seed or 0)
    else:
        decide_tasks = []
    test_tasks = evaluate.load_tasks(req.test, tokenizer, base_path) if req.test else []
    end_ids = evaluate.answer_ends(tokenizer, base_path, revision, remote)
    device = options.device or "cpu"
    model = None if req.eval_cmd else tune.load_model(base_path, device, revision, remote)
    keep = keep_mod.load(req.keep, req.keep_model, req.keep_weight, tokenizer, base_path,
                         model, end_ids, req.max_new_tokens, learning,
                         options.random_seed or 0, remote, req.batch_tokens, say)
    scorer = evaluate.Scorer(metric, end_ids, req.max_new_tokens, req.batch_tokens,
                             model is not None and evaluate.prefix_agrees(model, tasks))
    limit = int(req.max_memory * 2**30) if req.max_memory else tune.default_max_memory()
    former = tune.Former(config, options, limit, model, in_memory=req.eval_cmd is None)
    if learning is not None:
        _check_learn_memory(config, model, former, limit)
    for method, reason in the_plan.left_out.items():
        say(f"tune: leaving out {method}: {reason}")
    line = tune.plan_line(the_plan.steps, the_plan.searched, req.budget,
                          len(the_plan.values["lambda"]))
    say(f"tune: {line}; "
        f"{len(tasks)} task(s), {sum(len(t.examples) for t in tasks)} examples"
        + (f" ({sum(len(t.examples) for t in decide_tasks)} more set aside to decide "
           f"learned vs static: --decide {learning.decide:g})" if decide_tasks else ""))
    # the recipe as written is scored after the plan's candidates: its Gram pass too
    former.prepare([c for _, settings, _ in the_plan.steps for c in settings]
                   + [tune.as_written(config)])
    say("tune: forming candidates " + ("in memory" if former.in_memory
                                        else f"on disk ({former.reason})"))
    if learning is not None and not former.in_memory:
        raise TuneError(f"--learn needs the candidates formed in memory: {former.reason}")
    if not former.in_memory:  # each candidate's own folder is loaded to score it
        model = former.model = None
    if former.collected is not None:
        say(f"tune: one Gram pass for every AWD candidate ({former.gram_seconds:.1f} s)")
    return Inputs(tasks, test_tasks, "external" if req.eval_cmd else metric, scorer, model,
                  former, device, remote, decide_tasks, keep)


def set_aside(tasks, fraction: float, seed: int):
    """(what the search, the fit and the step choice use; the decision part): a
    fraction of each task that nothing sees before learned vs static is decided."""
    for task in tasks:
        if len(task.examples) < 3:
            raise evaluate.AWDDataError(
                f"{task.path}: --learn needs at least 3 examples per task (to fit, to "
                f"choose the step, to decide learned vs static); it has "
                f"{len(task.examples)}")
    rest, decide, _ = evaluate.split(tasks, fraction, seed, salt="decide")
    return rest, decide


def _check_learn_memory(config, model, former, limit: int) -> None:
    k = len([m for m in config.models or [] if m.model != config.base_model])
    fitting = learn_mod.memory_needed(k, sum(p.numel() for p in model.parameters()))
    given = tune.input_bytes(config)
    need = int(learn_mod.ALLOCATOR * (fitting + given))
    if not former.in_memory or need > limit:
        raise TuneError(
            f"--learn needs about {need / 2**30:.1f} GiB: the inputs read once "
            f"({given / 2**30:.1f} GiB) and, for the fit, K + 4 = {k + 4} copies of "
            f"the model in float32 ({fitting / 2**30:.1f} GiB), plus "
            f"{learn_mod.ALLOCATOR - 1:.0%} for activations and the allocator; that "
            f"is over --max-memory {limit / 2**30:.1f} GiB"
            + (f" ({former.reason})" if former.reason else ""))


# -- scoring one candidate -----------------------------------------------------------


def run_candidate(req: Request, ins: Inputs, candidate, on_tasks,
                  keep: bool = False) -> Scored:
    """Form and score one candidate on ``on_tasks`` (and its keep loss: ``keep``)."""
    former, scorer = ins.former, ins.scorer
    start = time.perf_counter()
    if req.eval_cmd:
        return _external(req.eval_cmd, former, candidate, start)
    kept = None
    if former.in_memory and candidate.method not in tune.RANDOMIZED:
        tune.swap_in(ins.model, former.form(candidate))
        formed = time.perf_counter()
        scores = scorer.scores(ins.model, on_tasks)
        if keep and ins.keep is not None:
            kept = ins.keep.scores(ins.model)
    else:
        with former.on_disk(candidate) as folder:  # mergekit's run_merge, seeded
            formed = time.perf_counter()
            model = tune.load_model(folder, ins.device, None, ins.remote)
            scores = scorer.scores(model, on_tasks)
            if keep and ins.keep is not None:
                kept = ins.keep.scores(model)
    return Scored(scores, scorer.means(scores), formed - start,
                  time.perf_counter() - formed, kept)


def _external(eval_cmd: str, former, candidate, start: float):
    with former.on_disk(candidate) as folder:
        formed = time.perf_counter()
        command = eval_cmd.replace("{model}", shlex.quote(folder))
        proc = subprocess.run(command, shell=True, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"--eval-cmd failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    lines = [x for x in proc.stdout.strip().splitlines() if x.strip()]
    try:
        value = float(lines[-1].split()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"--eval-cmd printed no number on its last line: "
                           f"{(lines or [''])[-1][:200]!r}")
    return Scored({}, {"external": value}, formed - start, time.perf_counter() - formed)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


# -- search --------------------------------------------------------------------------


def search(req: Request, the_plan: Plan, ins: Inputs, record: Record, say) -> Search:
    """Every candidate of the plan scored in order (rows reused from the record where
    it has them), then the recipe as written if no candidate is it."""
    found = Search()

    def evaluate_one(candidate) -> Optional[tuple]:
        row = _score(req, ins, candidate, found, record, say)
        return None if row is None or not tune.usable(row) else evaluate.rank(
            row["mean"], ins.metric)

    try:
        for method, settings, per_setting in the_plan.steps:
            for setting in settings:
                if per_setting is None:  # an exact grid, or no lambda
                    evaluate_one(setting)
                    continue
                ranks: dict = {}
                path = tune.search_lambda(
                    lambda lam, c=setting: ranks.setdefault(
                        lam, evaluate_one(tune.with_lambda(c, lam))),
                    the_plan.values["lambda"], per_setting)
                entry = {"setting": tune.setting_label(setting), "path": [
                    {"lambda": lam, "phase": phase} for lam, phase in path]}
                why = tune.unfinished(ranks)
                if why is not None:
                    entry["not_done"] = why
                    say(f"tune: {entry['setting']}: the lambda search is not done: {why} "
                        f"(--budget more than {per_setting} per setting, or --lambda "
                        f"values around it)")
                found.searches.append(entry)
        recipe_candidate = tune.as_written(req.config)
        written = tune.candidate_config(req.config, recipe_candidate).to_yaml()
        if not any(tune.candidate_config(req.config, c).to_yaml() == written
                   for c in found.candidates):
            evaluate_one(recipe_candidate)
    except KeyboardInterrupt:
        found.interrupted = True
        say(f"tune: interrupted after {len(found.rows)} candidates; writing the table so far")
    if found.reused:
        say(f"tune: reused {found.reused} of {len(found.rows)} candidates from "
            f"{record.path}")
    return found


def _score(req, ins, candidate, found: Search, record: Record, say) -> Optional[dict]:
    """One candidate's row (appended to ``found`` and to the record), or None where it
    failed."""
    i = len(found.rows) + 1
    found.candidates.append(candidate)
    kept = record.row(candidate.label)
    if kept is not None:
        found.rows.append(kept)
        found.reused += 1
        say(f"[{i}] {candidate.label}: reused from the record")
        if ins.keep is not None and "error" not in kept and not ins.keep.fresh(kept):
            kept["keep"] = run_candidate(req, ins, candidate, [], keep=True).keep
            record.add(kept)  # its keep loss under this --keep, for the next run
            say(f"[{i}] {candidate.label}: keep loss {kept['keep']['loss']:.4g}")
        return kept
    row = {"candidate": candidate.label, "method": candidate.method,
           "settings": candidate.overrides()}
    if candidate.as_written:
        row["as_written"] = True
    try:
        scored = run_candidate(req, ins, candidate, ins.tasks, keep=True)
    except Exception as error:  # one candidate's failure: a row, and go on
        row.update(scores={}, mean={}, error=one_line(error))
        found.rows.append(row)
        say(f"[{i}] {candidate.label}: failed: {row['error']}")
        if len(found.rows) >= 2 and all(r.get("error") == row["error"] for r in found.rows):
            raise TuneError(f"tune: the first {len(found.rows)} candidates all failed the "
                            f"same way, so the rest would too: {row['error']}")
        return None
    row.update(scores=scored.scores, mean=scored.means, form_seconds=scored.form_seconds,
               score_seconds=scored.score_seconds)
    if scored.keep is not None:
        row["keep"] = scored.keep
    found.rows.append(row)
    record.add(row)
    say(f"[{i}] {candidate.label}: "
        + " ".join(f"{k} {v:.4g}" for k, v in scored.means.items())
        + (f", keep loss {scored.keep['loss']:.4g}" if scored.keep else "")
        + f"  (formed {scored.form_seconds:.2f} s, scored {scored.score_seconds:.2f} s)")
    return row


# -- compare -------------------------------------------------------------------------


def compare(req: Request, the_plan: Plan, ins: Inputs, found: Search) -> Result:
    rows, candidates, metric = found.rows, found.candidates, ins.metric
    if not any("error" not in r for r in rows):
        raise TuneError("tune: no candidate was scored"
                        + (f" ({rows[0]['error']})" if rows else ""))
    try:
        best = tune.choose(rows, metric)
    except RuntimeError:
        raise TuneError("tune: no candidate has a score that is a number "
                        "(every one is NaN or failed)")
    data = {
        "recipe": req.config.to_yaml(), "metric": metric,
        "form": "in memory" if ins.former.in_memory else "on disk",
        "gram_seconds": ins.former.gram_seconds, "candidates": rows, "best": best,
        "shared_prefix_scoring": ins.scorer.share_prefix,
        "interrupted": found.interrupted, "random_seed": tune.seed_of(req.options),
        "lambda_search": found.searches, "budget": req.budget if the_plan.searched else None,
        "budget_per_setting": {m: per for m, _, per in the_plan.steps if per is not None},
        "comparisons": [],
    }
    rivals = tune.rivals(rows, candidates, best, metric, req.config)
    if metric != "external":
        for j in rivals:
            data["comparisons"].append({
                "other": rows[j]["candidate"], "why": rivals[j],
                "validation": tune.compare(rows[best]["scores"], rows[j]["scores"], metric,
                                           selected=True)})
    return Result(data, best, rivals, chosen_label=candidates[best].label,
                  best_cfg=tune.candidate_config(req.config, candidates[best]))


# -- learn ---------------------------------------------------------------------------


def learn(req: Request, ins: Inputs, found: Search, result: Result, say) -> bool:
    """Each learnable method's learned merge; written after each. A method that fails
    is kept as a row with its error. Returns whether the user interrupted."""
    learning, rows, candidates = req.learning, found.rows, found.candidates
    split = evaluate.split(ins.tasks, learning.holdout, req.options.random_seed or 0)
    fit_tasks, held_tasks, held_index = split
    say(f"tune --learn {learning.kind}: fit on {sum(len(t.examples) for t in fit_tasks)} "
        f"examples, choose the step on {sum(len(t.examples) for t in held_tasks)} "
        f"(--holdout {learning.holdout:g}), decide on "
        f"{sum(len(t.examples) for t in ins.decide_tasks)}; objective {learning.objective}"
        + (f" + {ins.keep.weight:g} x keep loss on {len(ins.keep.fit.examples)} keep "
           f"examples (reported on the other {len(ins.keep.report.examples)})"
           if ins.keep is not None else ""))
    result.data["learned"], interrupted = [], False
    ins.former.shelf.clear()  # the fit needs that memory (_check_learn_memory)
    for method, static in learn_mod.starts(rows, candidates, ins.scorer):
        try:
            entry = learn_mod.learn(ins.former, ins.model, static, learning, fit_tasks,
                                    held_tasks, ins.scorer, req.options, keep=ins.keep,
                                    say=lambda text, m=method: say(f"learn {m}: {text}"))
        except Exception as error:  # one method's failure: a row, and go on
            result.data["learned"].append({"method": method, "error": one_line(error)})
            say(f"learn {method}: failed: {one_line(error)}; the static results stand")
            write(req, ins, found, result)
            continue
        static_row = rows[candidates.index(static)]
        entry.summary["static_held_out"] = evaluate.part_means(
            static_row["scores"], held_index, ins.scorer.names)
        if "keep" in static_row:
            entry.summary["static_keep_loss"] = static_row["keep"]["loss"]
        result.learned.append(entry)
        result.data["learned"].append(entry.summary)
        write(req, ins, found, result)  # best.yml stays the static one until all are in
        interrupted = entry.fit.interrupted
        if interrupted:
            break
    result.data["interrupted"] = interrupted
    result.data["best_learned"] = None
    if not interrupted:
        decide(req, ins, found, result, say)
    write(req, ins, found, result)
    return interrupted


def decide(req: Request, ins: Inputs, found: Search, result: Result, say) -> None:
    """The learned merge that scored best on the step part against the static choice,
    both scored on the decision part that neither the search, the fit nor the step
    choice saw; the learned one becomes best.yml only where the 95% interval of the
    difference excludes 0 in its favour."""
    i = learn_mod.top(result.learned, ins.scorer)
    static = found.candidates[result.best]
    if i is None:
        if result.learned:
            say("tune --learn: no fit moved from its static start (step 0 kept): "
                "best.yml stays the static one")
        return
    entry = result.learned[i]
    static_scored = run_candidate(req, ins, static, ins.decide_tasks)
    tune.swap_in(ins.model, entry.tensors)
    learned_scores = ins.scorer.scores(ins.model, ins.decide_tasks)
    # the static choice's keep loss is its row's (the same report part, scored once)
    keeps = None if ins.keep is None else (entry.summary["keep"],
                                           found.rows[result.best]["keep"])
    verdict = learn_mod.verdict(learned_scores, static_scored.scores, ins.metric, keeps)
    result.data["decision"] = {
        "learned": entry.label, "static": static.label,
        "examples": {t.name: len(t.examples) for t in ins.decide_tasks},
        "learned_mean": ins.scorer.means(learned_scores),
        "static_mean": static_scored.means, **verdict}
    say("tune --learn: decided on examples nothing before saw: "
        + tune.comparison_line(entry.label, static.label, verdict)
        + ("; keep: " + tune.comparison_line(entry.label, static.label, verdict["keep"])
           if "keep" in verdict else "") + "; "
        + ("the learned merge is best.yml" if verdict["adopted"] else
           "not adopted (" + verdict["why_not"] + "), so best.yml stays the static one "
           "(the learned recipe is learned.yml)"))
    if verdict["adopted"]:
        result.data["best_learned"] = i
        result.chosen_label, result.chosen_tensors, result.best_cfg = (
            entry.label, entry.tensors, entry.config)


# -- test ----------------------------------------------------------------------------


def test(req: Request, ins: Inputs, found: Search, result: Result) -> None:
    """The chosen merge, the learned ones, the static choice (where a learned merge
    was made) and every rival, scored once on --test; the decided learned merge
    against the static choice, paired."""
    data, candidates = result.data, found.candidates
    static_label = candidates[result.best].label
    tested = [(result.chosen_label, result.chosen_tensors)] + [
        (e.label, e.tensors) for e in result.learned if e.tensors is not result.chosen_tensors]
    if result.chosen_tensors is not None:
        tested.append((static_label, None))
    data["test"], scored = {}, {}
    for k, (label, tensors) in enumerate(tested):
        if tensors is None:
            static_scored = run_candidate(req, ins, candidates[result.best], ins.test_tasks)
            scores, means = static_scored.scores, static_scored.means
        else:
            tune.swap_in(ins.model, tensors)
            scores = ins.scorer.scores(ins.model, ins.test_tasks)
            means = ins.scorer.means(scores)
        scored[label] = scores
        item = {"candidate": label, "scores": scores, "mean": means}
        if k == 0:
            data["test"].update(item)
        elif tensors is None:
            data["test_static"] = item
        else:
            data.setdefault("test_learned", []).append(item)
    if "decision" in data:
        data["decision"]["test"] = tune.compare(scored[data["decision"]["learned"]],
                                                scored[static_label], ins.metric)
    for comparison, j in zip(data["comparisons"], result.rivals):
        scored = run_candidate(req, ins, candidates[j], ins.test_tasks)
        comparison["test"] = tune.compare(data["test"]["scores"], scored.scores, ins.metric)
        comparison["test_scores"], comparison["test_mean"] = scored.scores, scored.means


# -- write ---------------------------------------------------------------------------


def write(req: Request, ins: Inputs, found: Search, result: Result) -> None:
    """tune.json, best.yml, the learned recipes and the picture, each replaced whole."""
    out_dir = req.out_dir
    os.makedirs(out_dir, exist_ok=True)
    cfg = result.best_cfg
    _replace(os.path.join(out_dir, "best.yml"),
             tune.recipe_text(cfg, cfg.merge_method, req.options))
    for entry in result.learned:
        entry.write(out_dir)
    if result.learned:
        chosen = result.data.get("best_learned")
        top = result.learned[chosen] if chosen is not None else min(
            result.learned, key=lambda e: ins.scorer.rank(e.summary["held_out"]))
        top.write(out_dir, name="learned")
    _replace(os.path.join(out_dir, "tune.json"), json.dumps(result.data, indent=1))
    from mergekit_awd.tune_report import picture  # matplotlib-free SVG

    picture(found.rows, ins.metric, os.path.join(out_dir, "tune-lambda.svg"))


def _replace(path: str, text: str) -> None:
    """Write ``path`` whole or not at all (a reader never sees half a file)."""
    part = path + ".part"
    with open(part, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(part, path)


def merge_to(req: Request, ins: Inputs, found: Search, result: Result) -> None:
    if result.chosen_tensors is None:
        ins.former.merge(found.candidates[result.best], req.merge_to)
    else:
        entry = result.learned[result.data["best_learned"]]
        context.run_merge(result.best_cfg, req.merge_to, req.options,
                          source=result.best_cfg.to_yaml(),
                          known=ins.former.known_gram(entry.static))


# -- the whole run -------------------------------------------------------------------


def run(req: Request, say, show) -> bool:
    """The pipeline; ``show`` prints the report. Returns whether it was interrupted."""
    from mergekit_awd import tune_report

    check(req)
    the_plan = plan(req)
    ins = inputs(req, the_plan, say)
    record = Record.open(req, the_plan, ins.metric, say)
    found = search(req, the_plan, ins, record, say)
    result = compare(req, the_plan, ins, found)
    write(req, ins, found, result)  # the static stage is on disk from here on
    interrupted = found.interrupted
    if req.learning is not None and not interrupted:
        interrupted = learn(req, ins, found, result, say)
    if ins.test_tasks and not interrupted:
        test(req, ins, found, result)
        write(req, ins, found, result)
    show(tune_report.lines(req, ins, found, result))
    if req.merge_to and not interrupted:
        merge_to(req, ins, found, result)
        show([f"merged: {req.merge_to}"])
    return interrupted
