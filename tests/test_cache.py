"""The task cache when several processes build the same entry at once (parallel runs on a machine
whose cache is empty): every writer succeeds, and the entry is whole."""

import threading

import numpy as np

from gram_pyro.tasks.cache import cached

WRITERS = 8


def test_writers_of_one_entry_at_once_all_succeed_and_leave_a_whole_entry(tmp_path, capsys):
    ready = threading.Barrier(WRITERS)
    arrays = {"x": np.arange(200_000, dtype=np.int64)}

    def build():
        ready.wait()  # every writer has missed the cache; all write at once
        return arrays, {"n": 1}

    results = []
    threads = [threading.Thread(target=lambda: results.append(cached("demo", {"n": 1}, 1, build, tmp_path)))
               for _ in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert capsys.readouterr().err == ""
    assert len(results) == WRITERS
    assert sorted(path.suffix for path in tmp_path.iterdir()) == [".json", ".npz"]  # no temporary left

    def must_not_rebuild():
        raise AssertionError("the entry was rebuilt")

    reread, meta = cached("demo", {"n": 1}, 1, must_not_rebuild, tmp_path)
    assert np.array_equal(reread["x"], arrays["x"]) and meta == {"n": 1}
