"""The Gram pass reads its tensors in the reverse of the merge's order, asking the
kernel to read each task's bytes ahead (the bytes mergekit's LoadTensor reads),
never more than the window ahead of the task being computed."""

import os
import threading
import time

from safetensors import safe_open

from conftest import recipe
from mergekit_awd import context, mergekit_run, readahead, scope


def planned(family, **parameters):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions

    config = MergeConfiguration.model_validate(
        recipe(family["base"], family["fts"], **parameters))
    options = MergeOptions(copy_tokenizer=False, quiet=True)
    return config, options, mergekit_run.plan_tensor_tasks(config, options)


def test_ranges_are_the_bytes_mergekit_reads(family):
    _, _, tasks = planned(family)
    seen = 0
    for task in tasks:
        for path, offset, length in readahead.tensor_ranges(task):
            with open(path, "rb") as f:
                f.seek(offset)
                raw = f.read(length)
            with safe_open(path, "np") as st:
                names = [n for n in st.keys() if st.get_tensor(n).tobytes() == raw]
            assert task.output_weight.name in names, (path, offset)
            seen += 1
    # every tensor of the base and the 3 fine-tunes
    assert seen == 4 * len(tasks)


def test_gram_pass_reads_in_the_reverse_of_the_merge_order(family):
    config, options, tasks = planned(family, scope="global", select=".*")
    run = context.RunContext(config=config, options=options)
    collected = scope.collect_tasks(run, "awd", tasks, "cpu", "cpu")
    names = [t.name for t in collected.tensors]
    # mergekit's planner orders tensor tasks by their tensor's name (group label)
    assert len(names) == len(tasks) > 5
    assert names == sorted(names, reverse=True)


def test_readahead_stays_within_its_window(tmp_path, monkeypatch):
    path = tmp_path / "shard"
    path.write_bytes(b"\0" * 1000)
    asked, lock = [], threading.Lock()

    def fadvise(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        with lock:
            asked.append(offset)

    monkeypatch.setattr(readahead, "tensor_ranges", lambda t: [(str(path), t * 100, 100)])
    monkeypatch.setattr(os, "posix_fadvise", fadvise)

    def settle(n):
        deadline = time.time() + 10
        while len(asked) < n and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # nothing more may come
        with lock:
            return list(asked)

    with readahead.Readahead(range(8), window=250) as ahead:
        assert settle(2) == [0, 100]  # a third would put 300 bytes ahead of task 0
        ahead.at(1)
        assert settle(3) == [0, 100, 200]
        ahead.at(7)
        assert settle(8) == [i * 100 for i in range(8)]


def test_a_task_it_cannot_place_is_skipped_not_fatal(tmp_path, monkeypatch):
    path = tmp_path / "shard"
    path.write_bytes(b"\0" * 1000)
    asked = []

    def ranges(task):
        if task == 0:
            raise KeyError("not a safetensors model")
        return [(str(path), task * 100, 100)]

    monkeypatch.setattr(readahead, "tensor_ranges", ranges)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, a: asked.append(o))
    with readahead.Readahead(range(3)) as ahead:
        deadline = time.time() + 10
        while len(asked) < 2 and time.time() < deadline:
            time.sleep(0.01)
        ahead.at(2)
    assert asked == [100, 200]


def test_a_merge_reads_its_next_tensors_ahead(family, tmp_path, monkeypatch):
    from mergekit_awd import context as ctx

    config, options, tasks = planned(family, scope="tensor", steps=20)
    asked = set()
    real = os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        asked.add((os.path.realpath(f"/proc/self/fd/{fd}"), offset))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    ctx.run_merge(config, str(tmp_path / "out"), options)
    # mergekit runs the tensors in name order; from the kernel's first call on,
    # every later tensor's inputs were asked for ahead of their loading
    later = sorted(tasks, key=lambda t: t.output_weight.name)[1:]
    wanted = {(os.path.realpath(p), o) for t in later for p, o, _ in readahead.tensor_ranges(t)}
    assert wanted and wanted <= asked
